"""Tokenizers behind one interface: a SentencePiece model trained on the embedded corpus, or a local HF directory.

Why two: the embedded default must run offline end to end, so it trains its own small SentencePiece model on
the knowledge + note text (ChatML roles and think/answer tags as single-id symbols); real runs fine-tune an HF
checkpoint and must use that checkpoint's tokenizer and chat template. Everything downstream (pipelines,
sampler, rewards) only sees `Tokenizer`.

The SentencePiece model is trained so that `decode(encode(x)) == x` for any text: identity normalisation (no
NFKC, no whitespace folding, no dummy prefix), byte fallback for unseen characters, and `"\\n"` as its own symbol
(training is line-based, so newlines would otherwise only ever be byte pieces). The one exception is the
character U+2581 (SentencePiece's whitespace marker), which decodes as a space.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
SPECIAL_SYMBOLS: tuple[str, ...] = (IM_START, IM_END, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
PAD_PIECE, UNK_PIECE, BOS_PIECE = "<pad>", "<unk>", "<s>"

BUILD_COMMAND = "python -m raredx_jax.data.build --config=configs/data.py"


class Tokenizer:
    """What every consumer needs from a tokenizer; see docs/INTERFACES.md."""

    vocab_size: int
    pad_id: int
    eos_id: int  # end of an assistant turn / of a packed document: appended after every completion
    bos_id: int | None
    stop_ids: tuple[int, ...]  # generation stops at any of these

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        raise NotImplementedError

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))

    def pieces(self) -> list[str]:
        """Every token string by id (what a vocabulary digest hashes)."""
        raise NotImplementedError

    def digest(self) -> str:
        """sha256 of the vocabulary (pieces by id): a checkpoint records it, so a model is never paired with a
        tokenizer it was not trained with (e.g. after a data rebuild retrained the SentencePiece model).
        Computed once per tokenizer (the vocabulary never changes after loading): checks and every checkpoint
        save reuse it."""

        if getattr(self, "_digest", None) is None:
            self._digest = hashlib.sha256("\n".join(self.pieces()).encode("utf-8")).hexdigest()
        return self._digest

    def token_to_id(self, token: str) -> int | None:
        """Id of a single-token string (e.g. a special symbol), None if it is not one token."""
        raise NotImplementedError


def _check_messages(messages: Sequence[dict]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m["content"], str):
            raise TypeError(f"chat message {i} field 'content' must be str, got {type(m['content']).__name__}")


def chatml(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """ChatML rendering (`<|im_start|>role\\ncontent<|im_end|>\\n`), the format Qwen models use too."""
    _check_messages(messages)
    out = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


# Same format as a Jinja template, so an exported HF tokenizer renders exactly what `chatml` renders.
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --- SentencePiece ----------------------------------------------------------------------------------------------
def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    seed: int = 0,
    model_type: str = "bpe",
) -> Path:
    """Trains the embedded tokenizer; writes `<model_prefix>.model` and `.vocab`; returns the .model path.

    Deterministic (one thread, no input sampling, fixed seed): the same texts give a byte-identical model.
    `vocab_size` is a soft limit (`hard_vocab_limit=False`): a small corpus yields fewer pieces instead of
    failing; it must leave room for the 256 byte pieces and the special symbols.
    """

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"tokenizer.model_type must be 'bpe' or 'unigram', got {model_type!r}")
    n_fixed = 3 + len(SPECIAL_SYMBOLS) + 1 + 256
    if vocab_size <= n_fixed:
        raise ValueError(f"tokenizer.vocab_size={vocab_size} must exceed {n_fixed} (specials + 256 byte pieces)")
    spm.set_random_generator_seed(int(seed))
    writer = io.BytesIO()
    lines = _training_lines(texts)
    first = next(lines, None)
    if first is None:
        raise ValueError("train_sentencepiece: no non-empty text to train on")
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chain_first(first, lines),
        model_writer=writer,
        model_type=model_type,
        vocab_size=int(vocab_size),
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.9999,  # the rarest characters fall back to bytes instead of taking vocab slots
        user_defined_symbols=list(SPECIAL_SYMBOLS) + ["\n"],
        pad_id=0, unk_id=1, bos_id=2, eos_id=-1,
        pad_piece=PAD_PIECE, unk_piece=UNK_PIECE, bos_piece=BOS_PIECE,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=1 << 16,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    model_path = Path(str(model_prefix) + ".model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_suffix(".model.tmp")
    tmp.write_bytes(writer.getvalue())
    os.replace(tmp, model_path)  # atomic: a reader never sees half a model
    sp = spm.SentencePieceProcessor(model_proto=writer.getvalue())
    vocab_lines = [f"{sp.id_to_piece(i)}\t{sp.get_score(i)}" for i in range(sp.get_piece_size())]
    Path(str(model_prefix) + ".vocab").write_text("\n".join(vocab_lines) + "\n", encoding="utf-8")
    return model_path


def _chain_first(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with ChatML chat format; EOS = `<|im_end|>`, BOS = `<s>` (used for raw text)."""

    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer.path: no SentencePiece model at {self.path}")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        missing = [s for s in SPECIAL_SYMBOLS if self._sp.piece_to_id(s) == self._sp.unk_id()]
        if missing:
            raise ValueError(f"tokenizer.path: {self.path} lacks special symbols {missing}; "
                             f"train it with train_sentencepiece (run `{BUILD_COMMAND}`)")
        self.vocab_size = int(self._sp.get_piece_size())
        self.pad_id = int(self._sp.pad_id())
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
        self.eos_id = int(self._sp.piece_to_id(IM_END))
        self.stop_ids = (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        # ids past the vocabulary (a model whose embedding is padded beyond the tokenizer, as HF models often are,
        # can sample them) decode to nothing, as in HF tokenizers, instead of SentencePiece's IndexError
        n = self._sp.get_piece_size()
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < n])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return chatml(messages, add_generation_prompt)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != UNK_PIECE else int(i)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def save_hf(self, out_dir: str | os.PathLike) -> Path:
        """Writes this model as an HF tokenizer directory (tokenizer.json + config + ChatML template).

        Why: an exported checkpoint must load in transformers with its tokenizer. The `tokenizers` pipeline
        mirrors the training options (identity normalisation, whitespace as "▁" with no dummy prefix, split
        digits, byte fallback, the special symbols as added tokens) so it gives the same ids as SentencePiece;
        tests check that on varied text. Same ids, same pad/bos/eos (eos = `<|im_end|>`).
        """
        from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 - heavy (transformers ~0.8 s)

        sp = self._sp
        pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
        specials = [PAD_PIECE, UNK_PIECE, BOS_PIECE, *SPECIAL_SYMBOLS]
        fixed = set(specials) | {"\n"}
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        if self.model_type == "bpe":
            # SentencePiece BPE merges the adjacent pair whose union scores highest: rank merges by that score.
            normal = [(p, s) for i, (p, s) in enumerate(pieces)
                      if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)) and p not in fixed]
            merges = [(p[:k], p[k:]) for p, _ in sorted(normal, key=lambda x: -x[1]) for k in range(1, len(p))
                      if p[:k] in vocab and p[k:] in vocab]
            model = models.BPE(vocab=vocab, merges=merges, unk_token=UNK_PIECE, byte_fallback=True, fuse_unk=True)
        else:
            model = models.Unigram(pieces, unk_id=sp.unk_id(), byte_fallback=True)
        raw = RawTokenizer(model)
        raw.normalizer = normalizers.Replace(" ", "▁")
        raw.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
            pre_tokenizers.Digits(individual_digits=True)])
        raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        raw.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        raw.add_tokens([AddedToken("\n", special=False, normalized=False)])
        hf = PreTrainedTokenizerFast(
            tokenizer_object=raw, bos_token=BOS_PIECE, eos_token=IM_END, unk_token=UNK_PIECE, pad_token=PAD_PIECE,
            additional_special_tokens=list(SPECIAL_SYMBOLS), clean_up_tokenization_spaces=False)
        hf.chat_template = CHATML_JINJA
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out))
        return out

    @property
    def model_type(self) -> str:
        """'bpe' or 'unigram', from the model file's trainer spec (ModelProto.trainer_spec.model_type).

        Read from the protobuf wire format directly: sentencepiece's generated `sentencepiece_model_pb2` needs a
        protobuf runtime at least as new as the one it was generated with (7.x), while the GA4GH `phenopackets`
        package the importers use requires protobuf < 7, so the two generated modules cannot load together."""
        return "bpe" if _trainer_model_type(self.path.read_bytes(), str(self.path)) == _SP_BPE else "unigram"

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


_SP_BPE = 2  # sentencepiece_model.proto: TrainerSpec.ModelType { UNIGRAM = 1; BPE = 2; WORD = 3; CHAR = 4 }


def _varint(data: bytes, i: int, where: str) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError(f"{where}: truncated or malformed SentencePiece model (varint)")
        b = data[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return value, i


def _fields(data: bytes, where: str):
    """(field number, wire type, value) of one protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i, where)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i, where)
        elif wire == 2:
            size, i = _varint(data, i, where)
            value, i = data[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i:i + size], i + size
        else:
            raise ValueError(f"{where}: malformed SentencePiece model (wire type {wire})")
        if i > len(data):
            raise ValueError(f"{where}: truncated SentencePiece model")
        yield number, wire, value


def _trainer_model_type(model: bytes, where: str) -> int:
    """ModelProto.trainer_spec (field 2) .model_type (field 3); UNIGRAM (1) when unset, as protobuf defaults."""
    for number, wire, value in _fields(model, where):
        if number == 2 and wire == 2:
            for sub, sub_wire, sub_value in _fields(value, where):
                if sub == 3 and sub_wire == 0:
                    return int(sub_value)
            return 1
    return 1


# --- Hugging Face -----------------------------------------------------------------------------------------------
class HFTokenizer(Tokenizer):
    """A local HF tokenizer directory (never the hub), rendering prompts with the directory's chat template.

    EOS is the token the template closes an assistant turn with (e.g. `<|im_end|>` for Qwen, `<|eot_id|>` for
    Llama 3), so SFT targets end the way the template expects; the model's own eos token also stops generation.
    """

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer  # noqa: PLC0415 - heavy (transformers ~0.8 s)

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"tokenizer.path: HF tokenizer directory {self.path} does not exist")
        try:
            self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the field and directory named
            raise ValueError(f"tokenizer.path: cannot load an HF tokenizer from {self.path}: {e}") from e
        self.vocab_size = int(len(self._tok))
        self.bos_id = self._tok.bos_token_id
        eot = self._end_of_turn_id()
        model_eos = self._tok.eos_token_id
        if eot is None and model_eos is None:
            raise ValueError(f"tokenizer.path: {self.path} defines neither an eos token nor a chat template "
                             "turn end; cannot mark where completions end")
        self.eos_id = int(eot if eot is not None else model_eos)
        self.stop_ids = tuple(dict.fromkeys(i for i in (self.eos_id, model_eos) if i is not None))
        pad = self._tok.pad_token_id
        self.pad_id = int(pad if pad is not None else (model_eos if model_eos is not None else self.eos_id))

    @property
    def hf_tokenizer(self) -> Any:
        return self._tok

    def pieces(self) -> list[str]:
        return [str(t) for t in self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))]

    def _has_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def _end_of_turn_id(self) -> int | None:
        """The first special token the template writes after an assistant message's content."""
        if not self._has_template():
            return self.token_to_id(IM_END)
        marker = "ZQXJ-END-MARKER"
        text = self.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], add_generation_prompt=False)
        cut = text.rfind(marker)
        if cut < 0:
            return None
        ids = self.encode(text[cut + len(marker):])
        special = set(self._tok.all_special_ids) | {
            i for i, t in self._tok.added_tokens_decoder.items() if getattr(t, "special", False)}
        return next((int(i) for i in ids if i in special), None)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        _check_messages(messages)
        if not self._has_template():
            if self.token_to_id(IM_START) is None:
                raise ValueError(f"tokenizer.path: {self.path} has no chat_template and no {IM_START} token; "
                                 "add a chat template to tokenizer_config.json")
            return chatml(messages, add_generation_prompt)
        return self._tok.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    def token_to_id(self, token: str) -> int | None:
        ids = self._tok.encode(token, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def default_sentencepiece_path(config: Any) -> Path:
    return Path(config.data.dir) / "tokenizer" / "spm.model"


def load_tokenizer(config: Any) -> Tokenizer:
    """The tokenizer a run uses: `tokenizer.kind` + `tokenizer.path` (defaults documented in configs/base.py)."""
    kind = config.tokenizer.kind
    path = config.tokenizer.get("path", "") or ""
    if kind == "sentencepiece":
        p = Path(path) if path else default_sentencepiece_path(config)
        if not p.is_file():
            raise FileNotFoundError(
                f"tokenizer.path: SentencePiece model {p} not found. Build the embedded data and tokenizer first: "
                f"`{BUILD_COMMAND}` (with the same --config.data.dir), or set --config.tokenizer.path=FILE.model")
        return SentencePieceTokenizer(p)
    if kind == "hf":
        p = path or config.model.get("hf_path", "")
        if not p:
            raise ValueError("tokenizer.path: tokenizer.kind='hf' needs tokenizer.path or model.hf_path "
                             "(a local HF directory with tokenizer.json / tokenizer_config.json)")
        return HFTokenizer(p)
    raise ValueError(f"tokenizer.kind must be 'sentencepiece' or 'hf', got {kind!r}")
