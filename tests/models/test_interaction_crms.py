"""The feature-interaction CRMs of Table 2 (DeepFM, DCNv2, AutoInt) and their pooled history fields,
checked against hand-written references.

References: a per-sample loop for the masked mean pooling, the O(F'^2) pairwise inner-product loop for the
FM term, a per-sample float64 evaluation of each cross layer's formula, a per-head per-field softmax loop
for AutoInt's attention, sklearn's AUC for learning, and the checkpoint module's save / load round trip.
Batches are random but laid out as the loader lays them out (oldest first, right-aligned, PAD on the left).
"""

from __future__ import annotations

import copy
import doctest
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from reclora_ds.models import autoint, dcnv2, deepfm, pooled_fields
from reclora_ds.models.autoint import AutoInt, InteractingLayer
from reclora_ds.models.crm import CRMConfig, CRMOutput, FeatureSpec
from reclora_ds.models.dcnv2 import DCNv2
from reclora_ds.models.deepfm import DeepFM, fm_second_order
from reclora_ds.models.pooled_fields import PooledFieldEmbeddings, masked_mean
from reclora_ds.models.registry import build_crm
from reclora_ds.training.checkpoint import CRMCheckpointInfo, load_crm, save_crm_checkpoint
from tests.models.test_crm import ML1M_META, ML25M_META, make_batch, randomise_embeddings

MODELS = {"deepfm": DeepFM, "dcnv2": DCNv2, "autoint": AutoInt}
SMALL = {
    "embedding_dim": 8,
    "tower": (32, 16),
    "attention_size": 12,
    "cross_layers": 2,
    "interaction_layers": 2,
}
HISTORY_KEYS = ("hist_item", "hist_genre", "hist_rating")


def build(name: str, meta: dict = ML1M_META, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    config = CRMConfig(**{**SMALL, **overrides})
    return randomise_embeddings(build_crm(name, config, FeatureSpec.from_metadata(meta)), seed).eval()


def with_garbage_padding(batch: dict, seed: int = 7) -> dict:
    """``batch`` with other (valid) ids at every padded history position."""
    pad = ~batch["hist_mask"]
    g = torch.Generator().manual_seed(seed)
    noisy = dict(batch)
    for key in HISTORY_KEYS:
        noisy[key] = torch.where(pad, torch.randint(1, 7, batch[key].shape, generator=g), batch[key])
    return noisy


def mlp_by_hand(x: torch.Tensor, layers: nn.Sequential) -> torch.Tensor:
    """A ``Linear + ReLU (+ Dropout)`` stack in float64, one sample at a time."""
    for layer in layers:
        if isinstance(layer, nn.Linear):
            x = layer.weight.detach().double() @ x + layer.bias.detach().double()
        elif isinstance(layer, nn.ReLU):
            x = torch.clamp(x, min=0)
    return x


def pooled_by_hand(pooled: PooledFieldEmbeddings, batch: dict, b: int) -> list[torch.Tensor]:
    """Sample ``b``'s F' field vectors (float64) by a loop: its fields, then each history field's mean over
    the real positions, read from the target field's table (0 for an empty history)."""
    tables = pooled.embeddings.tables
    out = [tables[name].weight[batch[name][b]].detach().double() for name in pooled.embeddings.names]
    real = [j for j in range(batch["hist_mask"].shape[1]) if batch["hist_mask"][b, j]]
    for key, table in (
        ("hist_item", tables["item_id"]),
        ("hist_genre", tables["genre"]),
        ("hist_rating", pooled.embeddings.rating),
    ):
        total = torch.zeros(table.weight.shape[1], dtype=torch.float64)
        for j in real:
            total = total + table.weight[batch[key][b, j]].detach().double()
        out.append(total / len(real) if real else total)
    return out


# ---------------------------------------------------------------------------------------------------------
# Pooled history fields
# ---------------------------------------------------------------------------------------------------------


def test_masked_mean_equals_a_loop_and_empty_rows_give_zero():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, 7, 3, generator=g)
    mask = torch.rand(5, 7, generator=g) > 0.5
    mask[2] = False  # an empty history
    values[~mask] = float("nan")  # padded values never reach the result
    out = masked_mean(values, mask)
    for b in range(5):
        real = [values[b, j] for j in range(7) if mask[b, j]]
        want = torch.stack(real).mean(0) if real else torch.zeros(3)
        torch.testing.assert_close(out[b], want)
    assert torch.equal(out[2], torch.zeros(3))


@pytest.mark.parametrize("meta", [ML1M_META, ML25M_META], ids=["ml-1m", "ml-25m"])
def test_pooled_fields_equal_a_loop_and_ignore_padding(meta):
    model = build("deepfm", meta)
    batch = make_batch(meta, batch=6, length=9, seed=2, lengths=[9, 3, 0, 5, 1, 9])
    stack = model.fields(batch)
    n_fields = len(meta["fields"]) + 3  # + pooled item_id, genre, rating
    assert model.fields.field_names[-3:] == HISTORY_KEYS
    assert stack.shape == (6, n_fields, 8)
    for b in range(6):
        want = torch.stack(pooled_by_hand(model.fields, batch, b)).float()
        torch.testing.assert_close(stack[b], want)
    assert torch.equal(stack[2, -3:], torch.zeros(3, 8))  # empty history -> zeros
    assert torch.equal(model.fields(with_garbage_padding(batch)), stack)


def test_history_fields_share_the_target_fields_tables():
    model = build("deepfm", ML25M_META)
    names = [n for n, _ in model.named_parameters() if n.startswith("fields.")]
    assert sorted(names) == [
        "fields.embeddings.rating.weight",
        "fields.embeddings.tables.genre.weight",
        "fields.embeddings.tables.item_id.weight",
        "fields.embeddings.tables.user_id.weight",
    ]
    # a one-behaviour history equal to the target pools to the target's own vectors
    batch = make_batch(ML25M_META, batch=4, length=5, seed=3, lengths=[1, 1, 1, 1])
    batch["hist_item"][:, -1] = batch["item_id"]
    batch["hist_genre"][:, -1] = batch["genre"]
    stack = model.fields(batch)  # user_id, item_id, genre, hist_item, hist_genre, hist_rating
    assert torch.equal(stack[:, 3], stack[:, 1]) and torch.equal(stack[:, 4], stack[:, 2])


def test_behaviour_fields_choose_the_pooled_item_fields():
    model = build("dcnv2", behaviour_fields=["item_id"])  # the authors' layout: item ids and ratings only
    assert model.fields.field_names == (*ML1M_META["fields"], "hist_item", "hist_rating")
    assert model.cross.layers[0].in_features == (len(ML1M_META["fields"]) + 2) * 8
    batch = make_batch(ML1M_META)
    del batch["hist_genre"]
    model(batch)  # does not need the history's genres


# ---------------------------------------------------------------------------------------------------------
# DeepFM: the FM term against the pairwise loop
# ---------------------------------------------------------------------------------------------------------


def test_fm_term_equals_the_pairwise_inner_product_loop():
    g = torch.Generator().manual_seed(4)
    fields = torch.randn(6, 7, 5, generator=g, dtype=torch.float64)
    out = fm_second_order(fields)
    for b in range(6):
        want = sum(
            float(fields[b, f] @ fields[b, k]) for f in range(7) for k in range(f + 1, 7)
        )  # O(F'^2 E) over unordered pairs
        assert out[b].item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_deepfm_equals_first_order_plus_fm_plus_dnn_by_hand():
    model = build("deepfm")
    randomise_embeddings(model.first_order, seed=5)  # non-trivial first-order weights
    batch = make_batch(ML1M_META, batch=5, length=8, seed=6, lengths=[8, 2, 0, 5, 8])
    out = model(batch)
    for b in range(5):
        v = pooled_by_hand(model.fields, batch, b)
        first = sum(float(w) for w in pooled_by_hand(model.first_order, batch, b))
        fm = sum(float(v[f] @ v[k]) for f in range(len(v)) for k in range(f + 1, len(v)))
        hidden = mlp_by_hand(torch.cat(v), model.tower.layers)
        deep = float(model.head.weight.detach().double() @ hidden + model.head.bias.detach().double())
        torch.testing.assert_close(out.hidden[b], hidden.float(), rtol=1e-5, atol=1e-6)
        assert out.logit[b].item() == pytest.approx(first + fm + deep, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# DCNv2: cross layers against their formula
# ---------------------------------------------------------------------------------------------------------


def test_cross_layer_equals_its_formula():
    torch.manual_seed(0)
    net = dcnv2.CrossNetwork(6, layers=3)
    x0 = torch.randn(4, 6)
    out = net(x0)
    for b in range(4):
        x = x0[b].double()
        for layer in net.layers:  # x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, element by element
            w, bias = layer.weight.detach().double(), layer.bias.detach().double()
            x = torch.tensor(
                [
                    x0[b, i].double() * (sum(w[i, k] * x[k] for k in range(6)) + bias[i]) + x[i]
                    for i in range(6)
                ],
                dtype=torch.float64,
            )
        torch.testing.assert_close(out[b], x.float(), rtol=1e-5, atol=1e-6)


def test_dcnv2_equals_cross_then_dnn_by_hand():
    model = build("dcnv2", cross_layers=3)
    batch = make_batch(ML1M_META, batch=4, length=7, seed=8, lengths=[7, 0, 3, 7])
    out = model(batch)
    for b in range(4):
        x0 = torch.cat(pooled_by_hand(model.fields, batch, b))
        x = x0
        for layer in model.cross.layers:
            x = x0 * (layer.weight.double() @ x + layer.bias.double()) + x
        hidden = mlp_by_hand(x, model.tower.layers)
        logit = model.head.weight.double() @ hidden + model.head.bias.double()
        torch.testing.assert_close(out.hidden[b], hidden.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.logit[b], logit[0].float(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# AutoInt: attention against a per-head loop
# ---------------------------------------------------------------------------------------------------------


def attention_by_hand(layer: InteractingLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's interacting layer, x [F', E_in] -> ([F', A], weights [N, F', F']), float64 loops."""
    n_fields = x.shape[0]
    x = x.double()
    wq, wk, wv, wr = (
        m.weight.detach().double() for m in (layer.query, layer.key, layer.value, layer.residual)
    )
    d = layer.head_dim
    heads, all_weights = [], []
    for h in range(layer.heads):
        rows = slice(h * d, (h + 1) * d)
        head_out, head_weights = [], []
        for m in range(n_fields):
            q = wq[rows] @ x[m]
            scores = [float(q @ (wk[rows] @ x[k])) for k in range(n_fields)]
            top = max(scores)
            exps = [math.exp(s - top) for s in scores]
            alpha = [e / sum(exps) for e in exps]
            head_out.append(sum(alpha[k] * (wv[rows] @ x[k]) for k in range(n_fields)))
            head_weights.append(alpha)
        heads.append(torch.stack(head_out))  # [F', d_h]
        all_weights.append(torch.tensor(head_weights, dtype=torch.float64))
    attended = torch.cat(heads, dim=1)  # [F', A]
    residual = x @ wr.T  # [F', A]
    return torch.clamp(attended + residual, min=0), torch.stack(all_weights)


@pytest.mark.parametrize("heads", [1, 3])
def test_interacting_layer_equals_a_per_head_softmax_loop(heads):
    torch.manual_seed(1)
    layer = InteractingLayer(5, 12, heads=heads).eval()
    x = torch.randn(3, 6, 5)
    out = layer(x)
    _, weights = layer.attention(x)
    assert out.shape == (3, 6, 12) and weights.shape == (3, heads, 6, 6)
    for b in range(3):
        want, want_weights = attention_by_hand(layer, x[b])
        torch.testing.assert_close(out[b], want.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights[b], want_weights.float(), rtol=1e-5, atol=1e-6)


def test_autoint_equals_interacting_layers_then_tower_by_hand():
    model = build("autoint", attention_heads=2, interaction_layers=2)
    batch = make_batch(ML1M_META, batch=3, length=6, seed=9, lengths=[6, 0, 2])
    out = model(batch)
    for b in range(3):
        x = torch.stack(pooled_by_hand(model.fields, batch, b))  # [F', E]
        for layer in model.interactions:
            x, _ = attention_by_hand(layer, x)
        hidden = mlp_by_hand(x.flatten(), model.tower.layers)
        logit = model.head.weight.double() @ hidden + model.head.bias.double()
        torch.testing.assert_close(out.hidden[b], hidden.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.logit[b], logit[0].float(), rtol=1e-5, atol=1e-6)


def test_autoint_heads_must_divide_the_attention_size():
    with pytest.raises(ValueError, match="attention_heads=5 must divide attention_size=12"):
        build("autoint", attention_heads=5)


# ---------------------------------------------------------------------------------------------------------
# The CRM contract, for each model
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("meta", [ML1M_META, ML25M_META], ids=["ml-1m", "ml-25m"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_contract_shapes_head_and_padding(name, meta):
    model = build(name, meta)
    assert type(model) is MODELS[name] and model.hidden_dim == 16
    batch = make_batch(meta, batch=6, length=10, seed=3)
    out = model(batch)
    assert isinstance(out, CRMOutput)
    assert out.logit.shape == (6,) and out.hidden.shape == (6, 16) and out.logit.dtype == torch.float32
    assert torch.isfinite(out.logit).all() and torch.isfinite(out.hidden).all()
    assert out.logit.std() > 0
    deep = model.head(out.hidden).squeeze(-1)
    if name == "deepfm":  # logit = first order + FM + head(hidden)
        fields = model.fields(batch)
        rest = model.first_order(batch).sum((1, 2)) + fm_second_order(fields)
        torch.testing.assert_close(out.logit, rest + deep)
    else:
        torch.testing.assert_close(out.logit, deep, rtol=0, atol=0)
    noisy = model(with_garbage_padding(batch))
    assert torch.equal(noisy.logit, out.logit) and torch.equal(noisy.hidden, out.hidden)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_changing_one_history_changes_only_that_sample(name):
    model = build(name)
    batch = make_batch(ML1M_META, batch=5, length=8, seed=4, lengths=[8, 8, 5, 2, 8])
    before = model(batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["hist_item"][0] = (batch["hist_item"][0] + 5) % 38 + 2
    after = model(changed)
    assert not torch.allclose(before.logit[0], after.logit[0])
    torch.testing.assert_close(before.logit[1:], after.logit[1:])
    torch.testing.assert_close(before.hidden[1:], after.hidden[1:])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dropout_only_in_train_mode(name):
    model = build(name, dropout=0.3)
    batch = make_batch(ML1M_META, seed=5)
    assert torch.equal(model(batch).logit, model(batch).logit)
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(batch).hidden, model(batch).hidden)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = build_crm(name, CRMConfig(**SMALL), FeatureSpec.from_metadata(ML1M_META)).train()
    batch = make_batch(ML1M_META, batch=32, length=10, seed=6)
    F.binary_cross_entropy_with_logits(model(batch).logit, batch["label"]).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {n}"


def separable_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Positive iff the target's genre is among the genres of the user's (real) history: learnable only
    through the pooled history field interacting with the target's field."""
    batch = make_batch(ML25M_META, batch=n, length=6, seed=seed)
    batch["label"] = ((batch["hist_genre"] == batch["genre"][:, None]) & batch["hist_mask"]).any(1).float()
    return batch


@pytest.fixture
def one_thread():
    """One intra-op thread (a few-ms step is slower with more on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_adamw_learns_a_separable_problem(name, one_thread):
    torch.manual_seed(0)
    config = CRMConfig(**{**SMALL, "embedding_dim": 16, "tower": (32, 32)})
    model = build_crm(name, config, FeatureSpec.from_metadata(ML25M_META)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    test = separable_batch(2048, seed=10_000)  # held-out samples (new user / item / history draws)
    labels = test["label"].numpy()
    assert 0.3 < labels.mean() < 0.7
    # What the history's length alone gives (a longer history more often holds the genre): about 0.77.
    length_only = roc_auc_score(labels, test["hist_mask"].sum(1).numpy())
    for step in range(300):
        batch = separable_batch(256, seed=step)
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(model(batch).logit, batch["label"]).backward()
        optimizer.step()
    with torch.no_grad():
        auc = roc_auc_score(labels, model.eval()(test).logit.numpy())
    assert auc > max(0.9, length_only + 0.1), (
        f"{name}: held-out AUC {auc:.3f} (length alone {length_only:.3f})"
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoint_round_trip(name, tmp_path):
    model = build(name, ML25M_META)
    spec = FeatureSpec.from_metadata(ML25M_META)
    info = CRMCheckpointInfo(
        model=name, config=model.config, feature_spec=spec, hidden_dim=model.hidden_dim,
        history_mode="recent", history_length=10,
    )  # fmt: skip
    save_crm_checkpoint(tmp_path / "crm", model, info)
    loaded, loaded_info = load_crm(tmp_path / "crm")
    assert type(loaded) is type(model) and not loaded.training
    assert loaded_info.model == name and loaded_info.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    batch = make_batch(ML25M_META, seed=11)
    a, b = model(batch), loaded(batch)
    assert torch.equal(a.logit, b.logit) and torch.equal(a.hidden, b.hidden)


# ---------------------------------------------------------------------------------------------------------
# Docstrings
# ---------------------------------------------------------------------------------------------------------

MODEL_FILES = (pooled_fields, deepfm, dcnv2, autoint)


def test_every_module_documents_args_and_an_example():
    for module in MODEL_FILES:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, nn.Module) and cls.__module__ == module.__name__:
                doc = inspect.getdoc(cls) or ""
                assert "Args:" in doc and "Example:" in doc, cls.__qualname__


@pytest.mark.parametrize("module", MODEL_FILES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples_run(module):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, globs=copy.copy(vars(module)))
    assert any(t.examples for t in tests)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0
