"""LoRA-One, LoRA-GA and the preconditioned optimizer, each against an independent plain computation."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import widelora as wl
from widelora.methods.gradients import estimate_gradients, group_by_budget
from widelora.methods.lora_ga import lora_ga_factors
from widelora.methods.lora_one import lora_one_factors, precondition_gradients
from widelora.testing.models import TinyMLP, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _batches(n: int = 3, b: int = 2, t: int = 10, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (b, t), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _autograd_gradients(
    model: nn.Module, batches: list[dict], suffixes: list[str]
) -> dict[str, torch.Tensor]:
    """Independent reference: requires_grad on W, backward on each batch's loss, mean over batches."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    grads: dict[str, torch.Tensor] = {}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for name, mod in model.named_modules():
            if name.endswith(tuple(suffixes)):
                grads[name] = grads.get(name, 0) + mod.weight.grad.double() / len(batches)
    return grads


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- gradient estimation ------------------------------------------------------------------------------------


def test_hook_gradients_equal_autograd_and_leave_the_model_alone():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    batches = _batches()
    mods = {n: m for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}
    flags = [p.requires_grad for p in model.parameters()]
    # a budget of two q/v-sized matrices forces several groups (each a pass over the data)
    got = estimate_gradients(model, mods, batches, memory_budget=2 * 32 * 32 * 4, progress=False)
    assert len(group_by_budget(dict.fromkeys(mods, (1, 1)), 8)) == len(mods) // 2
    ref = _autograd_gradients(model, batches, TARGETS)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name].double(), ref[name], rtol=1e-5, atol=1e-7)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_gradient_estimation_uses_a_custom_loss_and_num_batches():
    model = TinyMLP()
    xs = [torch.randn(4, 12) for _ in range(5)]

    def loss_fn(m, x):
        return m(x).pow(2).mean()

    got = estimate_gradients(
        model, {"up": model.up, "down": model.down}, xs, loss_fn=loss_fn, num_batches=2, progress=False
    )
    ref = copy.deepcopy(model)
    total = sum(loss_fn(ref, x) for x in xs[:2]) / 2
    total.backward()
    torch.testing.assert_close(got["down"], ref.down.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["up"], ref.up.weight.grad, rtol=1e-5, atol=1e-7)


def test_batches_without_labels_or_loss_fn_are_a_clear_error():
    model = tiny_llama()
    with pytest.raises(ValueError, match="labels"):
        estimate_gradients(
            model,
            {"q": model.model.layers[0].self_attn.q_proj},
            [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}],
            progress=False,
        )


# --- LoRA-One -----------------------------------------------------------------------------------------------


def _truncated(g: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(g.double())
    return (u[:, :r] * s[:r]) @ vh[:r], float(s[0])


@pytest.mark.parametrize("kind", ["widelora", "peft"])
def test_lora_one_initial_update_is_a_normalized_truncated_gradient_step(kind):
    base = tiny_llama()
    batches = _batches()
    ref = _autograd_gradients(base, batches, TARGETS)
    w_before = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(tuple(TARGETS))}
    rank, alpha, gamma = 4, 8, 64.0
    if kind == "widelora":
        model = wl.attach(base, TARGETS, rank=rank, alpha=alpha, seed=0)
    else:
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS))
    wl.initialize(model, "lora_one", batches=batches, gamma=gamma, progress=False)
    pairs = wl.lora_pairs(model)
    assert len(pairs) == 6
    for p in pairs:
        g_r, sigma1 = _truncated(ref[p.name], rank)
        expected = -(p.scale / (gamma * sigma1)) * g_r
        torch.testing.assert_close(p.delta().double(), expected, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(p.weight, w_before[p.name])  # W is not adjusted
        # the normalized step has spectral norm s / gamma
        assert torch.linalg.matrix_norm(p.delta().double(), ord=2).item() == pytest.approx(
            p.scale / gamma, rel=1e-4
        )


def test_lora_one_default_gamma_is_the_references_128():
    model = wl.attach(tiny_llama(), ["q_proj"], rank=2, seed=0)
    wl.initialize(model, "lora_one", batches=_batches(1), progress=False)
    for p in wl.lora_pairs(model):
        assert torch.linalg.matrix_norm(p.delta(), ord=2).item() == pytest.approx(p.scale / 128, rel=1e-4)


def test_lora_one_lowrank_svd_matches_exact_on_a_low_rank_gradient():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(40, 3, generator=gen) @ torch.randn(3, 30, generator=gen)
    b_e, a_e = lora_one_factors(g, 3, svd="exact")
    b_l, a_l = lora_one_factors(g, 3, svd="lowrank", q=10, niter=8, seed=0)
    torch.testing.assert_close(b_l @ a_l, b_e @ a_e, rtol=1e-3, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(2, 12), data=st.data())
def test_lora_one_factors_property(m, n, data):
    r = data.draw(st.integers(1, min(m, n)))
    gamma = data.draw(st.floats(1.0, 256.0))
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 100 + n), dtype=torch.float64)
    b0, a0 = lora_one_factors(g, r, gamma=gamma, svd="exact")
    g_r, sigma1 = _truncated(-g, r)
    torch.testing.assert_close((b0 @ a0).double(), g_r / (gamma * sigma1), rtol=1e-4, atol=1e-6)
    # balanced factors: B0^T B0 == A0 A0^T (both diag(S_r) / (S_0 gamma))
    torch.testing.assert_close(b0.T @ b0, a0 @ a0.T, rtol=1e-4, atol=1e-6)


# --- LoRA-GA ------------------------------------------------------------------------------------------------


def test_lora_ga_factors_follow_the_reference_formula():
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(20, 16, generator=gen)
    r, gamma = 3, 16.0
    b0, a0 = lora_ga_factors(g, r, gamma=gamma, svd="exact")
    u, _s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    factor = 20**0.25 / gamma**0.5
    # singular vectors are defined up to sign: compare the sign-invariant projectors and the scale
    torch.testing.assert_close((a0.T @ a0).double(), factor**2 * vh[:r].T @ vh[:r], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        (b0 @ b0.T).double(), factor**2 * u[:, r : 2 * r] @ u[:, r : 2 * r].T, rtol=1e-4, atol=1e-6
    )


def test_lora_ga_keeps_the_output_and_its_saved_adapter_reproduces_finetuning_in_peft(tmp_path):
    base_copy = tiny_llama()
    model = wl.attach(tiny_llama(), TARGETS, rank=4, alpha=8, seed=0)
    batches = _batches()
    x = batches[0]["input_ids"]
    with torch.no_grad():
        y_base = model(input_ids=x).logits
    wl.initialize(model, "lora_ga", batches=batches, progress=False)
    with torch.no_grad():
        y_init = model(input_ids=x).logits
    torch.testing.assert_close(y_init, y_base, rtol=1e-4, atol=1e-5)
    pairs = wl.lora_pairs(model)
    assert all(p.base_offset is not None for p in pairs)
    assert all(p.delta().abs().max() > 0 for p in pairs)
    # finetune a few steps, then save and reload into real PEFT on the unmodified base model
    opt = wl.create_optimizer(model, lr=1e-2)
    for batch in batches:
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    with torch.no_grad():
        y_tuned = model(input_ids=x).logits
    assert (y_tuned - y_base).abs().max() > 1e-3
    wl.save_adapter(model, tmp_path / "ga")
    peft_model = PeftModel.from_pretrained(base_copy, tmp_path / "ga").eval()
    with torch.no_grad():
        y_peft = peft_model(input_ids=x).logits
    torch.testing.assert_close(y_peft, y_tuned, rtol=1e-4, atol=1e-4)
    # a rank-2r PEFT adapter: [B_f, -B0] [A_f; A0]
    assert peft_model.peft_config["default"].r == 8


# --- bad input: clear errors, nothing modified --------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["lora_one", "lora_ga"])
def test_gradient_scheme_without_data_is_an_error_and_changes_nothing(scheme):
    model = wl.attach(tiny_llama(), ["q_proj"], rank=2, seed=0)
    before = _state(model)
    with pytest.raises(ValueError, match="batches"):
        wl.initialize(model, scheme)
    assert _same_state(before, _state(model))


def test_rank_beyond_the_gradient_rank_is_an_error_and_changes_nothing():
    # k_proj is 32 -> 16: LoRA-GA needs 2r <= 16, so r = 9 is refused (LoRA-One accepts it)
    model = wl.attach(tiny_llama(), ["k_proj"], rank=9, seed=0)
    before = _state(model)
    with pytest.raises(ValueError, match=r"rank 9 is too large.*2r|rank 9 is too large"):
        wl.initialize(model, "lora_ga", batches=_batches(1), progress=False)
    assert _same_state(before, _state(model))
    with pytest.raises(ValueError, match="rank"):
        lora_one_factors(torch.randn(5, 4), 5)


def test_model_without_matching_modules_is_an_error():
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        wl.initialize(model, "lora_one", batches=_batches(1))
    with pytest.raises(ValueError, match="match no module"):
        wl.attach(model, ["not_a_layer"], rank=2)
    assert _same_state(before, _state(model))


def test_unknown_options_and_bad_gamma_are_errors_and_change_nothing():
    model = wl.attach(tiny_llama(), ["q_proj"], rank=2, seed=0)
    before = _state(model)
    with pytest.raises(ValueError, match="unknown options"):
        wl.initialize(model, "lora_one", batches=_batches(1), gama=3)
    with pytest.raises(ValueError, match="gamma"):
        wl.initialize(model, "lora_one", batches=_batches(1), gamma=-1)
    with pytest.raises(ValueError, match="svd"):
        wl.initialize(model, "lora_ga", batches=_batches(1), svd="qr")
    assert _same_state(before, _state(model))


def test_gradient_is_taken_on_the_base_function_even_after_a_previous_init():
    """A second init sees the user's base model: B zeroed and a moved W restored during the estimate."""
    batches = _batches()
    model = wl.attach(tiny_llama(), ["q_proj"], rank=2, alpha=4, seed=0)
    wl.initialize(model, "lora_ga", batches=batches, progress=False)
    wl.initialize(model, "lora_one", batches=batches, progress=False)
    first = {p.name: p.delta().clone() for p in wl.lora_pairs(model)}
    fresh = wl.attach(tiny_llama(), ["q_proj"], rank=2, alpha=4, seed=0)
    wl.initialize(fresh, "lora_one", batches=batches, progress=False)
    for p in wl.lora_pairs(fresh):
        torch.testing.assert_close(first[p.name], p.delta(), rtol=1e-5, atol=1e-8)
    # leaving LoRA-GA put the original W back
    for p, q in zip(wl.lora_pairs(model), wl.lora_pairs(fresh), strict=True):
        torch.testing.assert_close(p.weight, q.weight, rtol=1e-6, atol=1e-6)


# --- the preconditioned optimizer ---------------------------------------------------------------------------


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 8, bias=False)
        self.l2 = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def _two_layer_with_nonzero_adapters(ratio_order: bool = False) -> nn.Module:
    torch.manual_seed(3)
    model = wl.attach(TwoLayer(), ["l1", "l2"], rank=2, alpha=2, seed=0)
    with torch.no_grad():
        for p in wl.lora_pairs(model):
            p.B.copy_(torch.randn_like(p.B) * 0.5)
    return model


def _loss(model: nn.Module) -> torch.Tensor:
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(7))
    return model(x).pow(2).sum()


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("loraplus", [False, True])
def test_preconditioned_adamw_first_step_equals_the_closed_form(bias_correction, loraplus):
    model = _two_layer_with_nonzero_adapters()
    lr, lam, eps, betas, ratio = 1e-2, 1e-6, 1e-8, (0.9, 0.999), 4.0
    opt = wl.create_optimizer(
        model,
        lr=lr,
        method="lora_one_precond",
        lam=lam,
        eps=eps,
        betas=betas,
        ratio=ratio,
        bias_correction=bias_correction,
        loraplus=loraplus,
    )
    pairs = wl.lora_pairs(model)
    before = [(p.A.detach().clone(), p.B.detach().clone()) for p in pairs]
    _loss(model).backward()
    grads = [(p.A.grad.clone(), p.B.grad.clone()) for p in pairs]
    opt.step()
    for p, (a, b), (ga, gb) in zip(pairs, before, grads, strict=True):
        # closed form, written out: preconditioners from the pre-step factors, then one Adam step
        pa = (
            torch.linalg.inv(b.double().T @ b.double() + lam * torch.eye(2, dtype=torch.float64))
            @ ga.double()
        )
        pb = gb.double() @ torch.linalg.inv(
            a.double() @ a.double().T + lam * torch.eye(2, dtype=torch.float64)
        )
        for value, old, g, lr_p in ((p.A, a, pa, lr), (p.B, b, pb, lr * (ratio if loraplus else 1.0))):
            m = (1 - betas[0]) * g
            v = (1 - betas[1]) * g * g
            step = lr_p * ((1 - betas[1]) ** 0.5 / (1 - betas[0]) if bias_correction else 1.0)
            expected = old.double() - step * m / (v.sqrt() + eps)
            torch.testing.assert_close(value.detach().double(), expected, rtol=1e-5, atol=1e-7)


def test_plain_scaled_gd_step_and_the_sequential_reference_variant():
    model = _two_layer_with_nonzero_adapters()
    lr, lam = 0.05, 1e-3
    opt = wl.create_optimizer(model, lr=lr, method="scaled_gd", adam=False, lam=lam, sequential=True)
    pairs = wl.lora_pairs(model)
    before = [(p.A.detach().clone(), p.B.detach().clone()) for p in pairs]
    _loss(model).backward()
    grads = [(p.A.grad.clone(), p.B.grad.clone()) for p in pairs]
    opt.step()
    for p, (a, b), (ga, gb) in zip(pairs, before, grads, strict=True):
        pa, _ = precondition_gradients(a, b, ga, gb, lam)
        new_a = a - lr * pa
        torch.testing.assert_close(p.A.detach(), new_a, rtol=1e-5, atol=1e-7)
        _, pb = precondition_gradients(new_a, b, ga, gb, lam)  # sequential: B's uses the updated A
        torch.testing.assert_close(p.B.detach(), b - lr * pb, rtol=1e-5, atol=1e-7)


def test_pairs_come_from_the_pair_view_not_parameter_order():
    model = _two_layer_with_nonzero_adapters()
    opt = wl.create_optimizer(model, lr=1e-3, method="scaled_gd")
    for p in wl.lora_pairs(model):
        assert opt.partners[id(p.A)][1] is p.B and opt.partners[id(p.B)][1] is p.A
    with pytest.raises(ValueError, match="unknown options"):
        wl.create_optimizer(model, lr=1e-3, method="lora_one_precond", lamda=1.0)
    with pytest.raises(ValueError, match="lam"):
        wl.create_optimizer(model, lr=1e-3, method="lora_one_precond", lam=-1.0)
    with pytest.raises(ValueError, match=r"no LoRA pairs|has none|trainable"):
        wl.create_optimizer(TinyMLP(), lr=1e-3, method="lora_one_precond")


def test_preconditioned_training_on_a_peft_model_reduces_the_loss():
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batches = _batches(2)
    wl.initialize(model, "lora_one", batches=batches, progress=False)
    opt = wl.create_optimizer(model, lr=1e-2, method="lora_one_precond")
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(**batches[0]).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_lora_one_on_gpt2_conv1d_and_with_a_memory_budget():
    """Conv1D stores W as (in, out): G must still come out (out, in); grouping must not change the result."""
    from widelora.testing.models import tiny_gpt2

    base = tiny_gpt2()
    batches = _batches()
    ref = copy.deepcopy(base)
    grads: dict[str, torch.Tensor] = {}
    for batch in batches:
        ref.zero_grad()
        ref(**batch).loss.backward()
        for name, mod in ref.named_modules():
            if name.endswith(("c_attn", "c_fc")):
                grads[name] = grads.get(name, 0) + mod.weight.grad.T.double() / len(batches)  # to (out, in)
    model = wl.attach(base, ["c_attn", "c_fc"], rank=3, alpha=3, seed=0)
    wl.initialize(model, "lora_one", batches=batches, gamma=8.0, memory_budget=32 * 96 * 4, progress=False)
    for p in wl.lora_pairs(model):
        g_r, sigma1 = _truncated(grads[p.name], 3)
        torch.testing.assert_close(
            p.delta().double(), -(p.scale / (8.0 * sigma1)) * g_r, rtol=1e-4, atol=1e-8
        )


# --- cheap gradient-informed inits: randomized SVD policy and layer-by-layer gradients
# -----------------------


def _gapped(m: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A matrix whose top-k singular values (10 ... 1) stand 100x above the rest (0.01 ... 0)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    s = torch.cat([torch.linspace(10, 1, k), torch.linspace(0.01, 0, min(m, n) - k)]).double()
    return ((u[:, : len(s)] * s) @ v[:, : len(s)].T).float()


def test_auto_svd_is_randomized_only_where_the_rank_is_far_below_the_sizes():
    from widelora.methods.gradient_svd import choose_svd

    assert choose_svd((576, 1536), 64) == "lowrank"
    assert choose_svd((576, 1536), 512) == "exact"  # sketch as wide as the matrix: no saving
    assert choose_svd((128, 512), 8) == "exact"  # small matrices stay exact
    assert choose_svd((576, 1536), 512, "lowrank") == "lowrank"


@pytest.mark.parametrize("scheme", ["lora_one", "lora_ga"])
def test_auto_randomized_svd_agrees_with_exact_on_a_spectral_gap(scheme):
    """Stated tolerance: the adapter update from the randomized path is within 1e-4 (relative, Frobenius)
    of the exact one on a 600 x 700 gradient with a 100x gap after the top 2r singular values."""
    from widelora.methods.gradient_svd import choose_svd

    r = 8
    g = _gapped(600, 700, 2 * r, seed=3)
    assert choose_svd(tuple(g.shape), 4 * r) == "lowrank"
    factors = lora_one_factors if scheme == "lora_one" else lora_ga_factors
    b_a, a_a = factors(g, r, seed=0)  # auto
    b_e, a_e = factors(g, r, svd="exact")
    if scheme == "lora_one":
        pairs = [(b_a @ a_a, b_e @ a_e)]
    else:  # singular vectors carry independent signs: compare the spanned subspaces (projectors)
        pairs = [(a_a.T @ a_a, a_e.T @ a_e), (b_a @ b_a.T, b_e @ b_e.T)]
    for got, want in pairs:
        assert (torch.linalg.norm(got - want) / torch.linalg.norm(want)).item() < 1e-4


def test_gradients_are_handed_over_layer_by_layer_during_backward():
    """With one batch each G is reduced the moment its output gradient arrives (last layer first), so the
    full-size gradients of all adapted weights are never held together; the values equal autograd's."""
    from widelora.methods.gradients import consume_gradients

    model = tiny_llama()
    mods = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    order: list[str] = []
    got: dict[str, torch.Tensor] = {}

    def on_done(name: str, g: torch.Tensor) -> None:
        order.append(name)
        got[name] = g

    consume_gradients(model, mods, _batches(1), on_done, progress=False)
    forward_order = list(mods)
    assert order == forward_order[::-1]
    ref = _autograd_gradients(model, _batches(1), ["q_proj", "down_proj"])
    for name in mods:
        torch.testing.assert_close(got[name].double(), ref[name], rtol=1e-4, atol=1e-6)
