"""Tokenizers: lossless round trip, special symbols as single ids, ChatML rendering, a local HF directory."""
from __future__ import annotations

import pytest
from ml_collections import config_dict

from raredx_jax.data import tokenizer as tok_lib
from raredx_jax.data.tokenizer import (
    CHATML_JINJA,
    SPECIAL_SYMBOLS,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)

CORPUS = [
    "Marfan syndrome (OMIM:154700) is an autosomal dominant disorder of connective tissue.",
    "Frequent findings include arachnodactyly, ectopia lentis and aortic root dilatation.",
    "A 6-year-old girl presented with hypotonia, seizures and café-au-lait spots.\nFamily history was negative.",
    "Referral letter: Dear colleague, I saw this 34 year old man with recurrent fractures.",
    "Noonan syndrome: short stature, pulmonary valve stenosis, webbed neck; onset in infancy.",
] * 8

VARIED = [
    "hello world",
    "  leading and trailing spaces  ",
    "multiple   spaces\tand\ttabs\n\nand blank lines\n",
    "Unicode: café, naïve, Ærøskøbing, 日本語のテキスト, emoji 🧬😀, math ≤ ≥ ±",
    "ids OMIM:154700, ORPHA:558 and HP:0001166 at 37.5°C",
    "<|im_start|>user\nWhat is it?<|im_end|>\n<think>reasoning</think>\n<answer>\n1. Marfan syndrome\n</answer>",
    "",
]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    return train_sentencepiece(CORPUS, d / "spm", vocab_size=400, seed=0)


def test_sentencepiece_round_trip(spm_path):
    tok = SentencePieceTokenizer(spm_path)
    for text in VARIED:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_ids_past_the_vocabulary_decode_to_nothing(spm_path):
    """A model whose embedding is padded past the tokenizer can sample such ids: decoding them must not crash
    (SentencePiece raised IndexError), and they add no text."""
    tok = SentencePieceTokenizer(spm_path)
    ids = tok.encode("tall stature")
    assert tok.decode(ids + [tok.vocab_size, tok.vocab_size + 39]) == tok.decode(ids) == "tall stature"


def test_sentencepiece_special_tokens_single_ids(spm_path):
    tok = SentencePieceTokenizer(spm_path)
    ids = {s: tok.encode(s) for s in SPECIAL_SYMBOLS}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({v[0] for v in ids.values()}) == len(SPECIAL_SYMBOLS)
    assert tok.eos_id == ids["<|im_end|>"][0] and tok.stop_ids == (tok.eos_id,)
    assert tok.pad_id == 0 and tok.bos_id is not None and tok.pad_id != tok.eos_id
    # Special symbols embedded in text are still one id each.
    seq = tok.encode("x<think>y</think>")
    assert ids["<think>"][0] in seq and ids["</think>"][0] in seq


def test_sentencepiece_deterministic(tmp_path, spm_path):
    again = train_sentencepiece(CORPUS, tmp_path / "again", vocab_size=400, seed=0)
    assert again.read_bytes() == spm_path.read_bytes()


def test_chat_template(spm_path):
    tok = SentencePieceTokenizer(spm_path)
    msgs = [{"role": "system", "content": "You are a clinician."}, {"role": "user", "content": "Note: fever."}]
    expected = ("<|im_start|>system\nYou are a clinician.<|im_end|>\n"
                "<|im_start|>user\nNote: fever.<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs) == expected
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == expected[: -len("<|im_start|>assistant\n")]
    assert tok.encode_chat(msgs) == tok.encode(expected)
    assert tok.decode(tok.encode_chat(msgs)) == expected
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "x"}])


def test_load_tokenizer_errors_name_field(tmp_path, spm_path):
    c = config_dict.ConfigDict({"tokenizer": {"kind": "sentencepiece", "path": ""},
                                "data": {"dir": str(tmp_path / "nowhere")}, "model": {"hf_path": ""}})
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.path.*raredx_jax\.data\.build"):
        load_tokenizer(c)
    c.tokenizer.path = str(spm_path)
    assert isinstance(load_tokenizer(c), SentencePieceTokenizer)
    c.tokenizer.kind = "hf"
    c.tokenizer.path = ""
    with pytest.raises(ValueError, match=r"tokenizer\.path.*model\.hf_path"):
        load_tokenizer(c)
    c.tokenizer.kind = "nope"
    with pytest.raises(ValueError, match="tokenizer.kind"):
        load_tokenizer(c)
    # Default path: <data.dir>/tokenizer/spm.model.
    c.tokenizer.kind = "sentencepiece"
    assert tok_lib.default_sentencepiece_path(c) == tmp_path / "nowhere" / "tokenizer" / "spm.model"


def _tiny_hf_dir(path):
    """A real (tiny) HF tokenizer directory built offline: byte-level BPE trained on a few lines + ChatML."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(CORPUS, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    hf.chat_template = CHATML_JINJA
    hf.save_pretrained(str(path))
    return path


def test_hf_tokenizer_local_dir(tmp_path):
    d = _tiny_hf_dir(tmp_path / "hf")
    tok = HFTokenizer(d)
    for text in VARIED:
        assert tok.decode(tok.encode(text)) == text
    msgs = [{"role": "user", "content": "Note: fever."}]
    assert tok.apply_chat_template(msgs) == tok_lib.chatml(msgs)
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end is not None and tok.eos_id == im_end  # the template's turn end, not <|endoftext|>
    assert tok.token_to_id("<|endoftext|>") in tok.stop_ids and im_end in tok.stop_ids
    assert tok.pad_id == tok.token_to_id("<|endoftext|>")
    for s in ("<|im_start|>", "<think>", "</answer>"):
        assert len(tok.encode(s)) == 1
    c = config_dict.ConfigDict({"tokenizer": {"kind": "hf", "path": ""}, "data": {"dir": str(tmp_path)},
                                "model": {"hf_path": str(d)}})
    loaded = load_tokenizer(c)
    assert isinstance(loaded, HFTokenizer) and loaded.vocab_size == tok.vocab_size


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_exports_to_hf_with_identical_ids(tmp_path, model_type):
    spm_file = train_sentencepiece(CORPUS, tmp_path / "spm", vocab_size=400, seed=0, model_type=model_type)
    sp = SentencePieceTokenizer(spm_file)
    assert sp.model_type == model_type
    hf = HFTokenizer(sp.save_hf(tmp_path / "hf"))
    assert (hf.vocab_size, hf.pad_id, hf.eos_id, hf.bos_id) == (sp.vocab_size, sp.pad_id, sp.eos_id, sp.bos_id)
    msgs = [{"role": "user", "content": "A 6-year-old girl with seizures."}]
    assert hf.apply_chat_template(msgs) == sp.apply_chat_template(msgs)
    for text in VARIED + CORPUS + ["word  two   three    four", "x 123456 y", "a\n\n\nb"]:
        assert hf.encode(text) == sp.encode(text), text
        assert hf.decode(sp.encode(text)) == text


def test_model_type_read_from_the_wire_format_without_sentencepiece_pb2():
    """ModelProto.trainer_spec.model_type read directly (the generated pb2 needs protobuf >= 7, phenopackets < 7):
    field 2 (trainer_spec, length-delimited) holding field 3 (model_type, varint); unset means UNIGRAM."""
    from raredx_jax.data.tokenizer import _trainer_model_type
    piece = b"\x0a\x03\x0a\x01a"  # field 1 (a piece) before the trainer spec
    assert _trainer_model_type(piece + b"\x12\x05\x08\x90\x03\x18\x02", "m") == 2  # other field, then BPE
    assert _trainer_model_type(b"\x12\x02\x18\x01", "m") == 1
    assert _trainer_model_type(b"\x12\x00", "m") == 1 and _trainer_model_type(piece, "m") == 1
    with pytest.raises(ValueError, match=r"^spm\.model: truncated"):
        _trainer_model_type(b"\x12\x05\x18", "spm.model")
