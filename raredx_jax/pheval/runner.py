"""`RaredxPhEvalRunner`: the class PhEval's ``pheval.plugins`` entry point names (needs the `[pheval]` extra).

PhEval constructs it with (input_dir, testdata_dir, tmp_dir, output_dir, config_file, version), builds the output
folders (tool_input_commands/, raw_results/, pheval_disease_results/ when ``disease_analysis: true`` in the input
dir's config.yaml) and calls prepare, run, post_process; the work is in `raredx_jax.pheval.steps`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pheval.runners.runner import PhEvalRunner

from raredx_jax.data.hpo import load_ontology
from raredx_jax.pheval import steps


@dataclass
class RaredxPhEvalRunner(PhEvalRunner):
    """raredx-jax's model (or, without a checkpoint, its HPO baseline) on a phenopacket corpus."""

    input_dir: Path
    testdata_dir: Path
    tmp_dir: Path
    output_dir: Path
    config_file: Path
    version: str

    def _options(self) -> steps.Options:
        return steps.Options.from_dict(self.input_dir_config.tool_specific_configuration_options)

    def prepare(self) -> str:
        counts = steps.prepare(self.testdata_dir, self.tool_input_commands_dir, load_ontology())
        return (f"{counts['n_cases']} of {counts['n_phenopackets']} phenopackets prepared, {counts['n_skipped']} "
                f"refused (listed in {Path(self.tool_input_commands_dir) / steps.REPORT_FILE})")

    def run(self) -> None:
        steps.run(self.tool_input_commands_dir, self.raw_results_dir, load_ontology(), self._options())

    def post_process(self) -> None:
        if not self.input_dir_config.disease_analysis:
            raise ValueError(f"{Path(self.input_dir) / 'config.yaml'}: disease_analysis must be true (raredx-jax "
                             "ranks diseases only)")
        steps.post_process(self.raw_results_dir, self.output_dir, self.testdata_dir, self.tool_input_commands_dir,
                           use_pheval=True)
