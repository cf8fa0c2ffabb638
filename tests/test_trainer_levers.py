"""The study's trainers compute what TRL's own do, with fewer FLOPs: the completion-only LM head on CPU and the
merged (optionally bf16) sampler, on the real SmolLM2-135M with the smoke profile's settings."""
import pytest
import torch

from rnlib import data, models, train
from rnlib.config import load_profile
from rnlib.rewards import completion_text

pytestmark = pytest.mark.slow


def _length_reward(completions, **_):
    """Rewards that differ inside every group, so that advantages, loss and gradients are not zero."""
    return [float(len(completion_text(c))) for c in completions]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    profile = load_profile("smoke")
    rows = train.rl_rows(data.take(data.harmful_split("cyber", "attack"), 2), "harmful")
    trainer = train.grpo_trainer(profile, profile.attack, models.resolve(profile.model), rows, _length_reward,
                                 str(tmp_path_factory.mktemp("levers")), seed=0, max_steps=1, save_strategy="no")
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    return trainer


@pytest.fixture(scope="module")
def batch(trainer):
    """One generation round as TRL prepares it for the loss: each prompt repeated num_generations times."""
    prompts = [row for row in trainer.train_dataset for _ in range(trainer.num_generations)]
    with torch.no_grad():
        return trainer._generate_and_score_completions(prompts)


def _logps(trainer, batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, batch["completion_ids"].size(1), compute_entropy=True)
    return logps, entropies


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad()
    return loss.item(), grads


def test_completion_only_head_equals_trls_own_path(trainer, batch):
    completion = batch["completion_mask"].bool()
    trl_logps, trl_entropies = _logps(trainer, batch)
    trl_loss, trl_grads = _loss_and_grads(trainer, batch)
    with train._completion_positions_only():
        logps, entropies = _logps(trainer, batch)
        loss, grads = _loss_and_grads(trainer, batch)
    torch.testing.assert_close(logps[completion], trl_logps[completion], rtol=0, atol=1e-5)
    # an entropy sums ~49k float32 terms, and the two paths multiply in a different order: allow float32 rounding
    torch.testing.assert_close(entropies[completion], trl_entropies[completion], rtol=1e-5, atol=1e-5)
    assert (logps[~completion] == 0).all() and (trl_logps[~completion] == 0).all()
    assert abs(loss - trl_loss) <= 1e-4  # often exactly 0: a group-mean advantage times a ratio of 1
    assert grads.keys() == trl_grads.keys() and len(grads) > 0
    assert max((grads[n] - trl_grads[n]).abs().max().item() for n in grads) <= 1e-4
    assert sum(g.norm() ** 2 for g in grads.values()) > 0


def test_a_training_step_scores_only_completion_tokens(tmp_path, monkeypatch):
    """Spy on the dense head inside a real step: it sees one row per completion token, no prompt or padding."""
    scored = []
    apply = train._DenseLogProbs.apply
    monkeypatch.setattr(train._DenseLogProbs, "apply",
                        staticmethod(lambda hidden, *args: scored.append(hidden.shape[0]) or apply(hidden, *args)))
    profile = load_profile("smoke")
    rows = train.rl_rows(data.take(data.harmful_split("cyber", "attack"), 2), "harmful")
    step = train.grpo_trainer(profile, profile.attack, models.resolve(profile.model), rows, _length_reward,
                              str(tmp_path), seed=0, max_steps=1, save_strategy="no")
    step.train()
    log = next(entry for entry in step.state.log_history if "completions/mean_length" in entry)
    batch = profile.attack.num_generations * profile.attack.prompts_per_step
    assert scored and set(scored) == {round(log["completions/mean_length"] * batch)}


def test_sft_uses_the_completion_only_head_and_a_trl_upgrade_fails_loudly(monkeypatch):
    from trl.trainer import utils as trl_utils

    assert issubclass(train._trainer_classes()[1], train._CompletionOnlyHead)
    monkeypatch.setattr(trl_utils, "add_fused_lm_head", lambda model: None)
    with pytest.raises(RuntimeError, match="pin trl==1.16.0"):
        train._check_trl_head()


def test_merged_sampling_draws_the_same_answers(trainer):
    """Merging LoRA is the same function: same seed, same answers; and the training weights come back."""
    model, tokenizer = trainer.model, trainer.processing_class
    for lora_b in (p for n, p in model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(lora_b, std=0.02)  # a trained adapter, not the all-zero start
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = [row["request"] for row in trainer.train_dataset]

    def answers():
        return models.generate(model, tokenizer, prompts, max_new_tokens=16, num_return_sequences=2, seed=3)

    unmerged = answers()
    with train._sampling_weights(model, None):
        merged = answers()
    assert merged == unmerged
    with train._sampling_weights(model, torch.bfloat16):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    after = dict(model.named_parameters())
    assert {p.dtype for p in after.values()} == {torch.float32}
    assert max((after[n] - before[n]).abs().max().item() for n in before) <= 1e-6


def test_bf16_sampling_draws_from_nearly_the_same_distribution(trainer):
    """The bf16 sampler's next-token distributions stay within a small KL of the fp32 policy that is trained."""
    model, tokenizer = trainer.model, trainer.processing_class
    texts = [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
             for row in trainer.train_dataset]
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        fp32 = model(**inputs).logits.float().log_softmax(-1)
        with train._sampling_weights(model, torch.bfloat16):
            bf16 = model(**inputs).logits.float().log_softmax(-1)
    kept = inputs["attention_mask"].bool()
    kl = (fp32.exp() * (fp32 - bf16)).sum(-1)[kept]
    assert kl.mean() < 0.01
    assert (fp32.argmax(-1) == bf16.argmax(-1))[kept].float().mean() >= 0.9


def test_sampling_precision_is_fp32_unless_asked_and_auto_follows_the_hardware(monkeypatch):
    cpu = load_profile("smoke")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert train.sampling_dtype(cpu) is None  # the default: fp32, the same samples on every CPU
    monkeypatch.setenv("RN_SAMPLING_DTYPE", "auto")
    assert train.sampling_dtype(cpu) == torch.bfloat16
    assert train.sampling_dtype(load_profile("smoke", {"bf16": True})) is None  # the weights are bf16 already
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert train.sampling_dtype(cpu) is None
    monkeypatch.setenv("RN_SAMPLING_DTYPE", "bfloat16")
    assert train.sampling_dtype(cpu) == torch.bfloat16
    monkeypatch.setenv("RN_SAMPLING_DTYPE", "fp8")
    with pytest.raises(ValueError, match="use float32, auto or bfloat16"):
        train.sampling_dtype(cpu)


def test_a_benign_only_kl_anchor_leaves_harmful_answers_at_trls_beta_zero():
    """`defend.kl_anchor: benign`: a harmful answer's KL term is 0 with zero gradient (its step is TRL's at beta 0),
    a benign answer's reference is TRL's own (the adapter-disabled model)."""
    profile = load_profile("smoke", {"defend.kl_anchor": "benign", "defend.beta": 0.2})
    rows = (train.rl_rows(data.take(data.harmful_split("cyber", "defense"), 1), "harmful")
            + train.rl_rows(data.take(data.benign_split("train"), 1), "benign"))
    anchored = train.grpo_trainer(profile, profile.defend, models.resolve(profile.model), rows, _length_reward,
                                  "unused", seed=0, max_steps=1, save_strategy="no")
    assert anchored.anchored_kinds == ("benign",) and anchored.beta == 0.2
    anchored.current_gradient_accumulation_steps = anchored.args.gradient_accumulation_steps
    torch.manual_seed(0)
    for name, param in anchored.model.named_parameters():
        if "lora_B" in name:  # a policy away from the reference, so that the KL term is not 0 everywhere
            param.data.normal_(0, 0.02)
    prompts = [row for row in anchored.train_dataset for _ in range(anchored.num_generations)]
    with torch.no_grad():
        batch = anchored._generate_and_score_completions(prompts)
    harmful = torch.tensor([row["kind"] == "harmful" for row in prompts])
    mask = batch["completion_mask"].bool()
    policy, _ = _logps(anchored, batch)
    with anchored.model.disable_adapter():
        reference, _ = _logps(anchored, batch)
    assert torch.allclose(batch["ref_per_token_logps"][harmful][mask[harmful]], policy[harmful][mask[harmful]],
                          atol=1e-5)
    assert torch.equal(batch["ref_per_token_logps"][~harmful][mask[~harmful]], reference[~harmful][mask[~harmful]])
    assert not torch.allclose(policy[~harmful][mask[~harmful]], reference[~harmful][mask[~harmful]], atol=1e-3)

    only_harmful = {k: v[harmful] if torch.is_tensor(v) and v.dim() and v.size(0) == len(prompts) else v
                    for k, v in batch.items()}
    anchored_loss, anchored_grads = _loss_and_grads(anchored, only_harmful)
    anchored.beta = 0.0
    free_loss, free_grads = _loss_and_grads(anchored, only_harmful)
    assert anchored_loss == pytest.approx(free_loss, abs=1e-6)
    for name, grad in free_grads.items():
        assert torch.allclose(anchored_grads[name], grad, atol=1e-6), name
