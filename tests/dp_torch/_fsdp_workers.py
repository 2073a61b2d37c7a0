"""Process-group workers for ``tests/dp_torch/test_fsdp.py`` (FSDP2, ``grad_sample_mode="ghost_fsdp"``).

Run through :func:`tests.dp_torch._dist_workers.run_group` as ``"tests.dp_torch._fsdp_workers:NAME"``
(spawned processes, a real gloo group). The models and data are also built by the test
process for the single-process oracle (a loop of batch-size-1 backward passes).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N = 48
SAMPLE_RATE = 0.25
BATCH_SIZE = 12  # the expected batch size N * q
SAMPLING_SEED = 5
NOISE_SEED = 13
LR = 0.5
MAX_GRAD_NORM = 0.05
SIGMA = 0.8
STEPS = 3
DELTA = 1e-5
VOCAB, SEQ, DIM, CLASSES = 11, 5, 8, 3


class TinyTransformer(nn.Module):
    """Embedding, one pre-norm self-attention block and an MLP, mean-pooled classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm1 = nn.LayerNorm(DIM)
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.norm2 = nn.LayerNorm(DIM)
        self.ff1, self.ff2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        a = self.norm1(h)
        scores = self.q(a) @ self.k(a).transpose(1, 2) / math.sqrt(DIM)
        h = h + self.o(torch.softmax(scores, dim=-1) @ self.v(a))
        h = h + self.ff2(torch.tanh(self.ff1(self.norm2(h))))
        return self.head(h.mean(dim=1))


def make_model(kind: str) -> nn.Module:
    """The model ``kind`` (``"mlp"``, ``"transformer"`` or ``"lora"``) with a fixed initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        if kind == "mlp":
            return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, CLASSES))
        model = TinyTransformer()
        if kind == "transformer":
            return model
        from peft import LoraConfig, get_peft_model

        lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v", "ff1"]))
        for p in lora.parameters():  # peft initialises B = 0: make every LoRA factor matter
            if p.requires_grad:
                nn.init.normal_(p, std=0.3)
        return lora


def make_dataset(kind: str) -> TensorDataset:
    """``N`` examples ``(input, label, index)``."""
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    else:
        x = torch.randint(0, VOCAB, (N, SEQ), generator=g)
    return TensorDataset(x, torch.randint(0, CLASSES, (N,), generator=g), torch.arange(N))


@dataclasses.dataclass(frozen=True)
class Case:
    """One sharded training configuration."""

    kind: str = "mlp"
    sigma: float = 0.0
    steps: int = STEPS
    momentum: float = 0.0
    max_physical_batch_size: Optional[int] = None
    bf16: bool = False
    wrap_model: bool = True


def full_params(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter as a full tensor (a collective for sharded ones)."""
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in model.parameters()]


def build(case: Case) -> dict[str, Any]:
    """The FSDP2 model, DP optimizer, ghost criterion and distributed Poisson loader of ``case``."""
    from dp_torch import PrivacyEngine
    from dp_torch.data_loader import DPDataLoader
    from dp_torch.utils.fsdp_utils import FSDP2Wrapper

    torch.set_default_dtype(torch.float64)
    net = make_model(case.kind)
    kwargs: dict[str, Any] = {}
    if case.bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    sharded = FSDP2Wrapper(net, **kwargs)
    loader = DPDataLoader(make_dataset(case.kind), sample_rate=SAMPLE_RATE, distributed=True,
                          seed=SAMPLING_SEED)
    engine = PrivacyEngine()
    trainable = [p for p in sharded.parameters() if p.requires_grad]
    model, optimizer, criterion, dp_loader = engine.make_private(
        module=sharded, optimizer=torch.optim.SGD(trainable, lr=LR, momentum=case.momentum),
        data_loader=loader, noise_multiplier=case.sigma, max_grad_norm=MAX_GRAD_NORM,
        criterion=nn.CrossEntropyLoss(), grad_sample_mode="ghost_fsdp",
        noise_generator=torch.Generator().manual_seed(NOISE_SEED), wrap_model=case.wrap_model,
    )
    if not case.wrap_model:
        model = sharded  # hooks on the model itself; make_private returned the hooks object
    return {"engine": engine, "model": model, "optimizer": optimizer, "criterion": criterion,
            "loader": dp_loader, "sharded": sharded}


def _batches(objs: dict[str, Any], case: Case) -> Any:
    if case.max_physical_batch_size is None:
        return objs["loader"], None
    from dp_torch.utils.batch_memory_manager import BatchMemoryManager

    bmm = BatchMemoryManager(data_loader=objs["loader"], optimizer=objs["optimizer"],
                             max_physical_batch_size=case.max_physical_batch_size)
    return bmm.__enter__(), bmm


def train(objs: dict[str, Any], case: Case) -> dict[str, Any]:
    """``case.steps`` logical steps; the local batches, chunk counts and full parameters."""
    model, optimizer, criterion = objs["model"], objs["optimizer"], objs["criterion"]
    loader, bmm = _batches(objs, case)
    batches, chunks, params, current, n_chunks = [], [], [], [], 0
    for x, y, idx in loader:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        current, n_chunks = current + idx.tolist(), n_chunks + 1
        if optimizer._is_last_step_skipped:
            continue
        batches.append(sorted(current))
        chunks.append(n_chunks)
        params.append(full_params(objs["sharded"]))
        current, n_chunks = [], 0
        if len(batches) == case.steps:
            break
    if bmm is not None:
        bmm.__exit__(None, None, None)
    engine = objs["engine"]
    return {"batches": batches, "chunks": chunks, "params": params,
            "epsilon": engine.get_epsilon(DELTA), "steps_recorded": len(engine.accountant)}


# --------------------------------------------------------------------------- workers


def train_cases(rank: int, world_size: int, workdir: str, cases: list[Case]) -> dict:
    """Train every case in turn; also report the local shard shapes (the parameters are sharded)."""
    results: dict[str, Any] = {}
    for case in cases:
        objs = build(case)
        results[case] = train(objs, case)
        results[case]["local_shapes"] = [tuple(p.to_local().shape) for p in objs["sharded"].parameters()]
    return results


def die_mid_step(rank: int, world_size: int, workdir: str) -> dict:
    """One good step; in the second, the last rank exits after its forward pass."""
    from dp_torch.distributed import DistributedStepError

    objs = build(Case(sigma=SIGMA, momentum=0.9))
    model, optimizer, criterion = objs["model"], objs["optimizer"], objs["criterion"]
    for step, (x, y, _) in enumerate(objs["loader"]):
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        if step == 1 and rank == world_size - 1:
            os._exit(17)
        before = [p.to_local().clone() for p in objs["sharded"].parameters()]
        state_before = copy.deepcopy(optimizer.state_dict())
        steps_before = len(objs["engine"].accountant)
        try:
            loss.backward()
            optimizer.step()
        except DistributedStepError as err:
            return {
                "step": step, "error": str(err),
                "params_unchanged": all(torch.equal(a, p.to_local()) for a, p in
                                        zip(before, objs["sharded"].parameters())),
                "state_unchanged": all(
                    torch.equal(a["momentum_buffer"].to_local(), b["momentum_buffer"].to_local())
                    for a, b in zip(state_before["state"].values(), optimizer.state_dict()["state"].values())),
                "steps_unchanged": steps_before == len(objs["engine"].accountant),
                "grads_cleared": all(p.grad is None for p in optimizer.params),
            }
    return {"error": None}


def save_after_one_step(rank: int, world_size: int, workdir: str) -> dict:
    """One step with momentum, then a sharded checkpoint; report what was saved."""
    from dp_torch.utils.fsdp_utils import save_fsdp_checkpoint

    case = Case(sigma=SIGMA, momentum=0.9, steps=1)
    objs = build(case)
    train(objs, case)
    save_fsdp_checkpoint(str(pathlib.Path(workdir) / "ckpt"), module=objs["model"],
                         optimizer=objs["optimizer"], privacy_engine=objs["engine"])
    return _snapshot(objs)


def load_and_report(rank: int, world_size: int, workdir: str, checkpoint: str) -> dict:
    """Build a fresh run, load ``checkpoint`` into it and report its state; then take a step."""
    from dp_torch.utils.fsdp_utils import load_fsdp_checkpoint

    case = Case(sigma=SIGMA, momentum=0.9, steps=1)
    objs = build(case)
    load_fsdp_checkpoint(checkpoint, module=objs["model"], optimizer=objs["optimizer"],
                         privacy_engine=objs["engine"])
    loaded = _snapshot(objs)
    loaded["after_step"] = train(objs, case)["steps_recorded"]
    return loaded


def _snapshot(objs: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    state = objs["optimizer"].state_dict()["state"]
    momentum = [(b.full_tensor() if isinstance(b, DTensor) else b).clone()
                for b in (s["momentum_buffer"] for s in state.values())]
    return {"params": full_params(objs["sharded"]), "momentum": momentum,
            "history": list(objs["engine"].accountant.history),
            "generator": objs["optimizer"].generator.get_state().clone()}


# --------------------------------------------------------------------------- the oracle


def oracle(kind: str, batches: list[list[int]], sigma: float) -> list[list[torch.Tensor]]:
    """The DP-SGD updates of one process on ``batches``: a loop of batch-size-1 backward passes,
    flat clipping, noise drawn parameter by parameter from the seeded generator, mean over the
    expected batch size, plain SGD. Returns the full parameters after each step."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _oracle_steps(kind, batches, sigma)
    finally:
        torch.set_default_dtype(default)  # the test process goes on with other tests


def _oracle_steps(kind: str, batches: list[list[int]], sigma: float) -> list[list[torch.Tensor]]:
    model, data = make_model(kind), make_dataset(kind)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(NOISE_SEED)
    out = []
    for batch in batches:
        total = [torch.zeros_like(p) for p in params]
        for i in batch:
            x, y, _ = data[i]
            grads = torch.autograd.grad(F.cross_entropy(model(x.unsqueeze(0)), y.view(1)), params)
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
            factor = min(1.0, MAX_GRAD_NORM / (float(norm) + 1e-6))
            total = [t + factor * g for t, g in zip(total, grads)]
        with torch.no_grad():
            for p, t in zip(params, total):
                noise = torch.normal(0.0, sigma * MAX_GRAD_NORM, size=tuple(p.shape), generator=generator,
                                     dtype=p.dtype) if sigma > 0 else torch.zeros_like(p)
                p -= LR * (t + noise) / BATCH_SIZE
        out.append([p.detach().clone() for p in model.parameters()])
    return out


# --------------------------------------------------------------------------- edge cases


def empty_share(rank: int, world_size: int, workdir: str) -> dict:
    """One step in which rank 0 holds examples 0-4 and every other rank none (zero rows)."""
    objs = build(Case("mlp"))
    x, y, _ = make_dataset("mlp")[torch.arange(5) if rank == 0 else torch.arange(0)]
    objs["optimizer"].zero_grad()
    objs["criterion"](objs["model"](x), y).backward()
    objs["optimizer"].step()
    return {"params": full_params(objs["sharded"]), "steps": len(objs["engine"].accountant)}


class _SkipOnOddBatch(nn.Module):
    """Two layers in one FSDP unit; the second is skipped when the batch has an odd size."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        return h if x.shape[0] % 2 else torch.tanh(self.second(h))


def diverging_layers(rank: int, world_size: int, workdir: str) -> dict:
    """Rank 0 runs 2 examples, rank 1 runs 3: their backward passes differ; report the error."""
    from torch.distributed.fsdp import fully_shard

    from dp_torch import PrivacyEngine

    torch.set_default_dtype(torch.float64)
    block = _SkipOnOddBatch()
    model = nn.Sequential(block, nn.Linear(6, CLASSES))
    fully_shard(block)
    fully_shard(model)
    loader = DataLoader(make_dataset("mlp"), batch_size=BATCH_SIZE)
    model, optimizer, criterion, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=MAX_GRAD_NORM, criterion=nn.CrossEntropyLoss(),
        grad_sample_mode="ghost_fsdp")
    x, y, _ = make_dataset("mlp")[torch.arange(2 + rank)]
    try:
        criterion(model(x), y).backward()
    except RuntimeError as err:
        return {"error": str(err), "grads": [p.grad for p in model.parameters()]}
    return {"error": None}


def secure_noise(rank: int, world_size: int, workdir: str) -> dict:
    """One secure-mode step of a zero loss: the update is the noise alone; return it whole."""
    from dp_torch import PrivacyEngine
    from dp_torch.utils.fsdp_utils import FSDP2Wrapper

    torch.manual_seed(0)
    model = FSDP2Wrapper(nn.Sequential(nn.Linear(128, 128)))
    data = TensorDataset(torch.zeros(N, 128), torch.zeros(N, dtype=torch.long))
    engine = PrivacyEngine(secure_mode=True)
    model, optimizer, criterion, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=BATCH_SIZE), noise_multiplier=1.0, max_grad_norm=1.0,
        criterion=nn.CrossEntropyLoss(), grad_sample_mode="ghost_fsdp")
    before = full_params(model._module)
    x, y = data[:3]
    optimizer.zero_grad()
    (criterion(model(x), y) * 0.0).backward()
    optimizer.step()
    after = full_params(model._module)
    return {"noise": [(b - a) * BATCH_SIZE for a, b in zip(after, before)]}


def make_gpt2() -> nn.Module:
    """A tiny GPT-2 (input and output embedding tied; position ids broadcast over the batch)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=17, n_positions=6, n_embd=8, n_layer=1, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(config).train()


def gpt2_tokens() -> torch.Tensor:
    return torch.randint(0, 17, (8, 6), generator=torch.Generator().manual_seed(1))


def lm_loss(criterion: Any, model: nn.Module, tokens: torch.Tensor) -> Any:
    """Next-token loss, one per sequence for a ghost criterion (logits as [batch, vocab, positions])."""
    logits = model(input_ids=tokens).logits[:, :-1]
    return criterion(logits.transpose(1, 2), tokens[:, 1:])


def private_lm(model: nn.Module, mode: str) -> tuple:
    """``make_private`` of a language model over :func:`gpt2_tokens`, zero noise, SGD lr 1."""
    from dp_torch import PrivacyEngine

    loader = DataLoader(TensorDataset(gpt2_tokens()), batch_size=8)
    wrapped, optimizer, criterion, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=MAX_GRAD_NORM, criterion=nn.CrossEntropyLoss(),
        grad_sample_mode=mode)
    return wrapped, optimizer, criterion


def gpt2_tied(rank: int, world_size: int, workdir: str) -> dict:
    """One step of GPT-2 sharded per block; rank r holds sequences 4r .. 4r + 3."""
    from torch.distributed.fsdp import fully_shard

    torch.set_default_dtype(torch.float64)
    model = make_gpt2()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    wrapped, optimizer, criterion = private_lm(model, "ghost_fsdp")
    optimizer.zero_grad()
    lm_loss(criterion, wrapped, gpt2_tokens()[4 * rank: 4 * rank + 4]).backward()
    optimizer.step()
    return {"params": full_params(model)}


def different_generators(rank: int, world_size: int, workdir: str) -> dict:
    """Every rank passes a generator seeded with its own rank: make_private must refuse."""
    from dp_torch import PrivacyEngine
    from dp_torch.utils.fsdp_utils import FSDP2Wrapper

    model = FSDP2Wrapper(make_model("mlp").double())
    engine = PrivacyEngine()
    try:
        engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            data_loader=DataLoader(make_dataset("mlp"), batch_size=BATCH_SIZE), noise_multiplier=SIGMA,
            max_grad_norm=MAX_GRAD_NORM, criterion=nn.CrossEntropyLoss(), grad_sample_mode="ghost_fsdp",
            noise_generator=torch.Generator().manual_seed(rank))
    except ValueError as err:
        return {"error": str(err), "steps": len(engine.accountant)}
    return {"error": None}
