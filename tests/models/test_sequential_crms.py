"""GRU4Rec, Caser and SASRec as CTR models, checked against hand-written references.

References: a step-by-step ``nn.GRUCell`` loop over the real behaviours (GRU4Rec), per-window loops of the
vertical and horizontal convolutions (Caser), a per-position single-head attention loop and
``nn.MultiheadAttention`` itself (SASRec), a hand-written tower over ``[fields; u; t; u * t]`` (the shared
CTR frame), scikit-learn's AUC (training) and the checkpoint module's save / load. Batches are laid out as
the loader lays them out (oldest first, right-aligned, PAD on the left): ``tests.models.test_crm.make_batch``.
"""

from __future__ import annotations

import copy
import doctest
import inspect

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from reclora_ds.models import caser, gru4rec, sasrec, sequence
from reclora_ds.models.caser import CASER_WINDOW, Caser
from reclora_ds.models.crm import Behaviours, CRMConfig, CRMOutput, FeatureSpec
from reclora_ds.models.gru4rec import GRU_HIDDEN_SIZE, GRU4Rec
from reclora_ds.models.registry import build_crm
from reclora_ds.models.sasrec import SASREC_MAX_POSITIONS, CausalSelfAttention, SASRec, attention_mask
from reclora_ds.training.checkpoint import CRMCheckpointInfo, load_crm, save_crm_checkpoint
from tests.models.test_crm import ML1M_META, ML25M_META, make_batch, randomise_embeddings

SEQUENTIAL = ("gru4rec", "caser", "sasrec")
CLASSES = {"gru4rec": GRU4Rec, "caser": Caser, "sasrec": SASRec}
SMALL = {"embedding_dim": 8, "tower": (32, 16), "attention_size": 16, "attention_heads": 2}


def build(name: str, meta: dict = ML1M_META, seed: int = 0, **overrides) -> nn.Module:
    """A small model in eval mode with embeddings large enough that every check sees non-zero differences."""
    torch.manual_seed(seed)
    config = CRMConfig(**{**SMALL, **overrides})
    return randomise_embeddings(build_crm(name, config, FeatureSpec.from_metadata(meta)), seed).eval()


def history_of(model: sequence.SequenceCTR, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The behaviour vectors [B, L, D] and mask [B, L] the encoder of ``model`` reads for ``batch``."""
    behaviours = Behaviours.from_batch(batch, model.behaviour_fields)
    return model.behaviour_vectors(behaviours), behaviours.mask


def assert_same_output(a: CRMOutput, b: CRMOutput) -> None:
    torch.testing.assert_close(a.logit, b.logit)
    torch.testing.assert_close(a.hidden, b.hidden)


def by_hand(x: torch.Tensor, layers: nn.Sequential) -> torch.Tensor:
    for layer in layers:
        if isinstance(layer, nn.Linear):
            x = x @ layer.weight.T + layer.bias
        elif isinstance(layer, nn.ReLU):
            x = torch.clamp(x, min=0)
    return x


# ---------------------------------------------------------------------------------------------------------
# The shared CTR frame: registry, shapes, head, tower input, padding, empty histories
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("meta", [ML1M_META, ML25M_META], ids=["ml-1m", "ml-25m"])
@pytest.mark.parametrize("item_merge", ["sum", "concat"])
@pytest.mark.parametrize("name", SEQUENTIAL)
def test_registry_builds_and_forward_shapes(name, item_merge, meta):
    model = build(name, meta, item_merge=item_merge)
    assert type(model) is CLASSES[name]
    batch = make_batch(meta, batch=6, length=9, seed=1)
    out = model(batch)
    assert isinstance(out, CRMOutput)
    assert out.logit.shape == (6,) and out.hidden.shape == (6, 16) and model.hidden_dim == 16
    assert torch.isfinite(out.logit).all() and torch.isfinite(out.hidden).all()
    torch.testing.assert_close(out.logit, model.head(out.hidden).squeeze(-1), rtol=0, atol=0)
    assert out.logit.std() > 0


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_tower_reads_fields_interest_target_and_their_product(name):
    model = build(name)
    batch = make_batch(ML1M_META, batch=5, length=9, seed=2, lengths=[9, 3, 0, 6, 1])
    out = model(batch)
    u = model.interest(batch)
    assert torch.equal(u[2], torch.zeros_like(u[2]))  # empty history: u = 0
    assert (u[[0, 1, 3, 4]].abs().sum(1) > 0).all()
    tables = model.embeddings.tables
    for b in range(5):
        fields = [tables[f].weight[batch[f][b]] for f in ML1M_META["fields"]]
        target = tables["item_id"].weight[batch["item_id"][b]] + tables["genre"].weight[batch["genre"][b]]
        hidden = by_hand(torch.cat([*fields, u[b], target, u[b] * target]), model.tower.layers)
        torch.testing.assert_close(out.hidden[b], hidden, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.logit[b], (model.head.weight @ hidden + model.head.bias)[0])


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_padded_ids_never_matter_and_empty_histories_work(name):
    model = build(name, sequence_layers=2)
    batch = make_batch(ML1M_META, batch=8, length=10, seed=3)
    pad = ~batch["hist_mask"]
    assert pad.any() and (batch["hist_len"] == 0).any()
    noisy = dict(batch)
    g = torch.Generator().manual_seed(7)
    for key in ("hist_item", "hist_genre", "hist_rating"):
        garbage = torch.randint(1, 7, batch[key].shape, generator=g)  # valid ids of every table
        noisy[key] = torch.where(pad, garbage, batch[key])
    assert_same_output(model(batch), model(noisy))

    empty = make_batch(ML1M_META, batch=4, length=10, seed=4, lengths=[0, 0, 0, 0])
    out = model(empty)
    assert torch.isfinite(out.logit).all() and torch.isfinite(out.hidden).all()
    assert torch.equal(model.interest(empty), torch.zeros(4, model.item_dim))
    # Its gradient is finite too (no NaN from an all-masked attention row or an empty packed sequence).
    model.train()
    model(empty).logit.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_more_left_padding_changes_nothing(name):
    """The same behaviours in a longer window (more PAD on the left) give the same output.

    Caser reads a fixed window and SASRec indexes positions by recency, so neither sees the window's length.
    """
    model = build(name, sequence_layers=2)
    batch = make_batch(ML1M_META, batch=5, length=6, seed=5, lengths=[6, 2, 0, 5, 1])
    wider = dict(batch)
    for key in ("hist_item", "hist_genre", "hist_rating", "hist_mask"):
        wider[key] = F.pad(batch[key], (7, 0))  # 7 more PAD slots on the left
    assert_same_output(model(batch), model(wider))


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_changing_one_history_changes_only_that_sample(name):
    model = build(name)
    batch = make_batch(ML1M_META, batch=5, length=8, seed=6, lengths=[8, 8, 5, 2, 8])
    changed = {k: v.clone() for k, v in batch.items()}
    changed["hist_item"][0] = (batch["hist_item"][0] + 5) % 38 + 2
    before, after = model(batch), model(changed)
    assert not torch.allclose(before.hidden[0], after.hidden[0])
    torch.testing.assert_close(before.hidden[1:], after.hidden[1:])
    torch.testing.assert_close(before.logit[1:], after.logit[1:])


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_order_of_the_history_matters(name):
    """Unlike DIN's sum over behaviours, a sequence encoder sees the order of the behaviours."""
    model = build(name)
    batch = make_batch(ML1M_META, batch=4, length=5, seed=7, lengths=[5, 5, 5, 5])
    reversed_ = dict(batch)
    for key in ("hist_item", "hist_genre", "hist_rating"):
        reversed_[key] = batch[key].flip(1)
    assert not torch.allclose(model(batch).hidden, model(reversed_).hidden)


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_eval_is_deterministic_and_train_mode_uses_dropout(name):
    model = build(name, dropout=0.3, sequence_layers=2)
    batch = make_batch(ML1M_META, seed=8)
    assert_same_output(model(batch), model(batch))
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(batch).hidden, model(batch).hidden)


# ---------------------------------------------------------------------------------------------------------
# GRU4Rec: u = the state after the most recent real behaviour, against an nn.GRUCell loop
# ---------------------------------------------------------------------------------------------------------


def gru_cells(gru: nn.GRU) -> list[nn.GRUCell]:
    """One nn.GRUCell per layer of ``gru``, holding that layer's weights."""
    cells = []
    for layer in range(gru.num_layers):
        cell = nn.GRUCell(gru.input_size if layer == 0 else gru.hidden_size, gru.hidden_size)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(gru, f"{name}_l{layer}"))
        cells.append(cell)
    return cells


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_gru4rec_state_equals_a_gru_cell_loop_over_real_behaviours(layers):
    model = build("gru4rec", sequence_layers=layers)
    assert model.gru.num_layers == layers and model.gru.hidden_size == GRU_HIDDEN_SIZE
    batch = make_batch(ML1M_META, batch=6, length=9, seed=9, lengths=[9, 4, 1, 0, 7, 9])
    history, mask = history_of(model, batch)
    states = model.states(history, mask)
    u = model.interest(batch)
    cells = gru_cells(model.gru)
    for b in range(6):
        s = [torch.zeros(GRU_HIDDEN_SIZE) for _ in cells]
        for j in range(9):
            if not mask[b, j]:
                continue  # left padding: no step at all
            x = history[b, j]
            for layer, cell in enumerate(cells):
                s[layer] = cell(x.unsqueeze(0), s[layer].unsqueeze(0))[0]
                x = s[layer]
        if mask[b].any():
            torch.testing.assert_close(states[b], s[-1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                u[b], model.output.weight @ s[-1] + model.output.bias, rtol=1e-5, atol=1e-6
            )
        else:
            assert torch.equal(u[b], torch.zeros(model.item_dim))


# ---------------------------------------------------------------------------------------------------------
# Caser: vertical and horizontal convolutions against loops over the window
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_caser_convolutions_equal_hand_written_loops():
    model = build("caser", caser_vertical_filters=3, caser_horizontal_filters=2, item_merge="concat")
    length = 8
    batch = make_batch(ML1M_META, batch=5, length=length, seed=10, lengths=[8, 5, 3, 0, 1])
    history, mask = history_of(model, batch)
    vertical, horizontal = model.convolutions(history, mask)
    n_v, n_h, window, dim = 3, 2, CASER_WINDOW, model.item_dim
    assert vertical.shape == (5, n_v, dim) and horizontal.shape == (5, window, n_h)
    u = model.interest(batch)
    for b in range(5):
        real = [history[b, j] for j in range(length) if mask[b, j]][-window:]  # last L' real behaviours
        image = torch.stack([torch.zeros(dim)] * (window - len(real)) + real)  # zero rows on top: [L', D]
        o_v = torch.zeros(n_v, dim)
        for k in range(n_v):
            for d in range(dim):
                w = model.vertical.weight[k, 0, :, 0]  # [L']
                o_v[k, d] = sum(w[i] * image[i, d] for i in range(window)) + model.vertical.bias[k]
        o_h = torch.zeros(window, n_h)
        for height in range(1, window + 1):
            conv = model.horizontal[height - 1]
            for k in range(n_h):
                values = [
                    max(float((conv.weight[k, 0] * image[i : i + height]).sum() + conv.bias[k]), 0.0)
                    for i in range(window - height + 1)
                ]
                o_h[height - 1, k] = max(values)
        torch.testing.assert_close(vertical[b], o_v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(horizontal[b], o_h, rtol=1e-5, atol=1e-6)
        if real:
            z = torch.cat([o_v.flatten(), o_h.flatten()])
            torch.testing.assert_close(
                u[b], torch.relu(model.fc.weight @ z + model.fc.bias), rtol=1e-5, atol=1e-6
            )
    # Only the last L' behaviours matter: changing an older one changes nothing.
    older = {k: v.clone() for k, v in batch.items()}
    older["hist_item"][0, : length - window] = 3
    torch.testing.assert_close(model(older).hidden, model(batch).hidden)


# ---------------------------------------------------------------------------------------------------------
# SASRec: causality, a single-head loop for one block, nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------------------


def test_sasrec_output_at_t_ignores_later_positions():
    model = build("sasrec", sequence_layers=2)
    batch = make_batch(ML1M_META, batch=4, length=8, seed=11, lengths=[8, 6, 8, 3])
    history, mask = history_of(model, batch)
    outputs = model.sequence_outputs(history, mask)
    for t in range(7):
        later = history.clone()
        later[:, t + 1 :] = torch.randn_like(later[:, t + 1 :])  # change every position after t
        changed = model.sequence_outputs(later, mask)
        torch.testing.assert_close(changed[:, : t + 1], outputs[:, : t + 1], rtol=0, atol=1e-6)
        real_later = mask[:, t + 1 :].unsqueeze(-1)
        assert not torch.allclose(changed[:, t + 1 :] * real_later, outputs[:, t + 1 :] * real_later)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    centred = x - x.mean()
    return centred / torch.sqrt((centred**2).mean() + norm.eps) * norm.weight + norm.bias


@pytest.mark.parametrize("item_merge", ["sum", "concat"])
def test_sasrec_one_block_equals_a_single_head_attention_loop(item_merge):
    model = build("sasrec", attention_heads=1, sequence_layers=1, item_merge=item_merge)
    length, width = 7, 16
    batch = make_batch(ML1M_META, batch=5, length=length, seed=12, lengths=[7, 3, 1, 0, 6])
    history, mask = history_of(model, batch)
    u = model.interest(batch)
    outputs = model.sequence_outputs(history, mask)  # [B, L, A]
    block = model.blocks[0]
    w_q, w_k, w_v = block.attention.in_proj.weight.split(width)
    b_q, b_k, b_v = block.attention.in_proj.bias.split(width)
    for b in range(5):
        real = [j for j in range(length) if mask[b, j]]
        if not real:
            assert torch.equal(u[b], torch.zeros(model.item_dim))
            continue
        x = {
            j: model.input.weight @ history[b, j] + model.input.bias + model.positions.weight[length - 1 - j]
            for j in real
        }
        out = {}
        for t in real:
            q = layer_norm(x[t], block.attention_norm)
            keys = [j for j in real if j <= t]
            scores = torch.stack([(w_q @ q + b_q) @ (w_k @ x[j] + b_k) / width**0.5 for j in keys])
            weights = torch.softmax(scores, dim=0)
            attended = sum(w * (w_v @ x[j] + b_v) for w, j in zip(weights, keys, strict=True))
            h = q + block.attention.out_proj.weight @ attended + block.attention.out_proj.bias
            y = layer_norm(h, block.ffn_norm)
            out[t] = layer_norm(y + by_hand(y, block.ffn), model.final_norm)
            torch.testing.assert_close(outputs[b, t], out[t], rtol=1e-5, atol=1e-5)  # every position
        last = out[real[-1]]
        torch.testing.assert_close(u[b], model.output.weight @ last + model.output.bias, rtol=1e-5, atol=1e-5)


def test_sasrec_attention_equals_torch_multihead_attention_where_a_query_has_keys():
    torch.manual_seed(13)
    width, heads, length = 16, 4, 6
    ours = CausalSelfAttention(width, heads).eval()
    reference = nn.MultiheadAttention(width, heads, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.in_proj.weight)
        reference.in_proj_bias.copy_(ours.in_proj.bias)
        reference.out_proj.weight.copy_(ours.out_proj.weight)
        reference.out_proj.bias.copy_(ours.out_proj.bias)
    mask = torch.arange(length)[None, :] >= torch.tensor([0, 2, 5])[:, None]  # right-aligned, 3 lengths
    q, x = torch.randn(3, length, width), torch.randn(3, length, width)
    # torch's convention: True = blocked
    causal_blocked = torch.ones(length, length, dtype=torch.bool).triu(1)
    want = reference(q, x, x, attn_mask=causal_blocked, key_padding_mask=~mask, need_weights=False)[0]
    got = ours(q, x, attention_mask(mask))
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all()  # a padded query reads itself: finite, whatever torch's path does


def test_sasrec_blocks_positions_and_length_limit():
    model = build("sasrec", sequence_layers=3, attention_size=32, attention_heads=4)
    assert len(model.blocks) == 3 and model.blocks[0].attention.heads == 4
    assert model.positions.weight.shape == (SASREC_MAX_POSITIONS, 32)
    too_long = make_batch(ML25M_META, batch=2, length=SASREC_MAX_POSITIONS + 1, seed=14)
    with pytest.raises(ValueError, match="error: history_length: .*SASREC_MAX_POSITIONS=256.*L=257"):
        build("sasrec", ML25M_META)(too_long)


# ---------------------------------------------------------------------------------------------------------
# Training on a problem only the order of the history solves, and checkpoints
# ---------------------------------------------------------------------------------------------------------


LIKED_GENRE = 2


def order_problem(n: int, seed: int, length: int = 8) -> dict:
    """Samples whose label is 1 iff the user's most recent behaviour is of genre :data:`LIKED_GENRE`.

    Every genre is equally frequent at every position of the history, so a model blind to the order (a
    bag of behaviours) cannot tell the label apart from the history's genre counts; one that knows which
    behaviour is the most recent can.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] >= (length - lengths)[:, None]  # right-aligned
    users, items, genres = (ML25M_META["fields"][f]["vocab_size"] for f in ("user_id", "item_id", "genre"))
    batch = {
        "user_id": torch.randint(2, users, (n,), generator=g),
        "item_id": torch.randint(2, items, (n,), generator=g),
        "genre": torch.randint(2, genres, (n,), generator=g),
        "hist_item": torch.randint(2, items, (n, length), generator=g) * mask,
        "hist_genre": torch.randint(2, genres, (n, length), generator=g) * mask,
        "hist_rating": torch.randint(1, 11, (n, length), generator=g) * mask,
        "hist_mask": mask,
        "hist_len": lengths,
    }
    batch["label"] = (batch["hist_genre"][:, -1] == LIKED_GENRE).float()
    return batch


@pytest.fixture
def one_thread():
    """One intra-op thread (the machine's other processes make more threads slower, not faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_auc(name: str, epochs: int = 4) -> float:
    """Held-out AUC (scikit-learn) of ``name`` after ``epochs`` AdamW epochs on :func:`order_problem`."""
    torch.manual_seed(0)
    config = CRMConfig(
        embedding_dim=16, tower=(32, 16), attention_size=16, attention_heads=2, attention_hidden=16
    )
    model = build_crm(name, config, FeatureSpec.from_metadata(ML25M_META))
    train, test = order_problem(2048, seed=20), order_problem(1024, seed=21)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(2048, generator=g).split(128):
            optimizer.zero_grad()
            part = {k: v[index] for k, v in train.items()}
            F.binary_cross_entropy_with_logits(model(part).logit, part["label"]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return roc_auc_score(test["label"].numpy(), model(test).logit.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("name", SEQUENTIAL)
def test_trains_on_a_problem_only_the_order_solves(name, one_thread):
    assert train_auc(name) > 0.97


@pytest.mark.slow
def test_an_order_blind_model_does_not_solve_it(one_thread):
    """The contrast that makes the test above mean something: DIN sums its behaviours, with no position."""
    assert 0.6 < train_auc("din") < 0.9


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_checkpoint_round_trip(name, tmp_path):
    model = build(name, sequence_layers=2)
    spec = FeatureSpec.from_metadata(ML1M_META)
    info = CRMCheckpointInfo(
        model=name,
        config=model.config,
        feature_spec=spec,
        hidden_dim=model.hidden_dim,
        history_mode="recent",
        history_length=10,
    )
    save_crm_checkpoint(tmp_path / "ckpt", model, info)
    loaded, read = load_crm(tmp_path / "ckpt")
    assert type(loaded) is CLASSES[name] and read.model == name and read.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    batch = make_batch(ML1M_META, batch=6, length=10, seed=15)
    assert_same_output(loaded(batch), model(batch))


# ---------------------------------------------------------------------------------------------------------
# Docstrings
# ---------------------------------------------------------------------------------------------------------


MODEL_FILES = (sequence, gru4rec, caser, sasrec)


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
    assert sum(len(t.examples) for t in tests) > 0
    for test in tests:
        runner.run(test)
    assert runner.failures == 0
