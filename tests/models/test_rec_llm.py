"""RecLLM on a tiny random Llama and a tiny SIM: scoring independent of batch composition, the loss on the
answer tokens only (checked against a hand computation), the zero-initialised adapter equal to the frozen
LM, what trains, the frozen CRM's mode, activation checkpointing, peft LoRA and 8-bit loading (CPU backend)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from reclora_ds.batch import IGNORE_INDEX
from reclora_ds.data.prompts import PromptEncoder, TextView, prompt_body
from reclora_ds.llm_loader import LLMLoadError, load_causal_lm
from reclora_ds.models.crm import CRMConfig, FeatureSpec
from reclora_ds.models.plora import PLoRAConfig
from reclora_ds.models.rec_llm import RecLLM, RecLLMConfig, answer_loss, last_logits, position_ids_from_mask
from reclora_ds.models.registry import build_crm
from tests.tiny_llm import CHAT_TEMPLATE, tiny_llama, word_tokenizer

META = {
    "category_field": "genre",
    "fields": {
        "user_id": {"source": "user", "vocab_size": 30},
        "item_id": {"source": "item", "vocab_size": 50},
        "genre": {"source": "item", "vocab_size": 8},
    },
}
L = 6  # CRM history length
TITLES = ["Heat (1995)", "Toy Story (1995)", "Jumanji (1995)", "Antz (1998)", "Titanic (1997)", "Up (2009)"]


def views() -> list[TextView]:
    """Prompts of very different lengths (1 to 12 history items)."""
    out = []
    for i, n in enumerate([1, 12, 4, 7, 2]):
        history = tuple((TITLES[(i + j) % len(TITLES)], float(1 + (i + j) % 5)) for j in range(n))
        out.append(TextView(TITLES[i % len(TITLES)], history, "The user is a man. His job is writer.", "M"))
    return out


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer([prompt_body("ml-1m", v) for v in views()])


def tiny_crm(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(1)
    # the authors' SIM (no short-term window, no behaviour ages): the batches below hold the long history only
    config = CRMConfig(
        embedding_dim=8, attention_hidden=16, tower=(32, 16), top_k=4, dropout=dropout,
        short_term_length=0, behaviour_age=False,
    )  # fmt: skip
    return build_crm("sim", config, FeatureSpec.from_metadata(META))


def id_view(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """CRM batch tensors of n samples (as the loader lays them out)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None, :] >= (L - lengths)[:, None]
    return {
        "sample_id": torch.arange(100, 100 + n),
        "label": torch.randint(0, 2, (n,), generator=g).float(),
        "user_id": torch.randint(2, 30, (n,), generator=g),
        "item_id": torch.randint(2, 50, (n,), generator=g),
        "genre": torch.randint(2, 8, (n,), generator=g),
        "hist_item": torch.randint(2, 50, (n, L), generator=g) * mask,
        "hist_genre": torch.randint(2, 8, (n, L), generator=g) * mask,
        "hist_rating": torch.randint(1, 11, (n, L), generator=g) * mask,
        "hist_mask": mask,
        "hist_len": lengths,
    }


def make_batch(encoder: PromptEncoder, rows: list[int], with_answer: bool) -> dict[str, torch.Tensor]:
    ids = id_view(len(views()))
    part = {k: v[rows] for k, v in ids.items()}
    chosen = [views()[r] for r in rows]
    return {**part, **encoder.encode(chosen, part["label"] if with_answer else None)}


def plora_model(tokenizer, randomize_b: bool = True, **config) -> RecLLM:
    model = RecLLM(
        tiny_llama(tokenizer),
        PromptEncoder(tokenizer, "ml-1m").answers,
        tiny_crm(),
        RecLLMConfig(adapter=PLoRAConfig(crm_dim=16, num_experts=4, rank=4, gate_dropout=0.0), **config),
    )
    if randomize_b:  # a trained-looking adapter, so the per-sample gates change the output
        torch.manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("plora_B"):
                    p.normal_(std=0.5)
    return model.eval()


@pytest.mark.parametrize("with_answer", [False, True])
def test_p_yes_alone_equals_p_yes_in_a_left_padded_batch(tokenizer, with_answer):
    encoder = PromptEncoder(tokenizer, "ml-1m")
    model = plora_model(tokenizer)
    batch = make_batch(encoder, [0, 1, 2, 3, 4], with_answer)
    assert (batch["attention_mask"] == 0).any()  # some rows are padded
    together = model.score(batch)
    for row in range(5):
        alone = model.score(make_batch(encoder, [row], with_answer))
        torch.testing.assert_close(together[row : row + 1], alone, atol=1e-5, rtol=0)
    reordered = model.score(make_batch(encoder, [4, 2, 0], with_answer))
    torch.testing.assert_close(reordered, together[[4, 2, 0]], atol=1e-5, rtol=0)
    assert together.std() > 1e-3  # the samples do get different scores


def test_score_is_the_yes_no_softmax_at_the_answer_position(tokenizer):
    """Ids resolved from the tokenizer; p(yes) = softmax over (Yes, No) logits before the first answer token."""
    encoder = PromptEncoder(tokenizer, "ml-1m")
    assert encoder.answers.yes_id == tokenizer.convert_tokens_to_ids("Yes")
    assert encoder.answers.no_id == tokenizer.convert_tokens_to_ids("No")
    llm = tiny_llama(tokenizer)
    model = RecLLM(copy.deepcopy(llm), encoder.answers, config=RecLLMConfig(mode="zero_shot"))
    batch = make_batch(encoder, [0, 1, 2], with_answer=True)
    with torch.no_grad():
        full = llm(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids_from_mask(batch["attention_mask"]),
        ).logits  # [B, T, V]
    for row in range(3):
        first_answer = int((batch["labels"][row] != IGNORE_INDEX).nonzero()[0])
        logits = full[row, first_answer - 1]
        want = torch.softmax(logits[[encoder.answers.yes_id, encoder.answers.no_id]], dim=0)[0]
        torch.testing.assert_close(model.score(batch)[row], want, atol=1e-6, rtol=0)


def test_loss_is_the_cross_entropy_of_the_answer_tokens_only(tokenizer):
    encoder = PromptEncoder(tokenizer, "ml-1m")
    model = plora_model(tokenizer)
    batch = make_batch(encoder, [0, 1, 3], with_answer=True)
    labels = batch["labels"]
    answer_len = len(encoder.answers.yes_ids)
    assert ((labels != IGNORE_INDEX).sum(1) == answer_len).all()
    with torch.no_grad():
        out = model(batch)
        with model.routing(batch):
            full = model.llm(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=position_ids_from_mask(batch["attention_mask"]),
            ).logits  # [B, T, V], the adapted model on every position
    terms = []
    for row in range(len(labels)):
        for pos in (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist():
            log_probs = torch.log_softmax(full[row, pos - 1].double(), dim=-1)
            terms.append(-log_probs[labels[row, pos]])
    want = torch.stack(terms).mean()
    torch.testing.assert_close(out.loss.double(), want, atol=1e-5, rtol=1e-5)
    # the same as Hugging Face's own causal-LM loss given these labels (-100 outside the answer)
    with torch.no_grad(), model.routing(batch):
        hf = model.llm(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids_from_mask(batch["attention_mask"]),
            labels=labels,
        ).loss
    torch.testing.assert_close(out.loss, hf, atol=1e-5, rtol=1e-5)


def test_zero_initialised_adapter_equals_the_frozen_lm(tokenizer):
    encoder = PromptEncoder(tokenizer, "ml-1m")
    base = tiny_llama(tokenizer)
    model = RecLLM(
        copy.deepcopy(base),
        encoder.answers,
        tiny_crm(),
        RecLLMConfig(adapter=PLoRAConfig(crm_dim=16, num_experts=4)),
    ).eval()
    batch = make_batch(encoder, [0, 1, 2, 3, 4], with_answer=True)
    kwargs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "position_ids": position_ids_from_mask(batch["attention_mask"]),
    }
    with torch.no_grad():
        want = base(**kwargs).logits
        with model.routing(batch):
            got = model.llm(**kwargs).logits
        reference = RecLLM(copy.deepcopy(base), encoder.answers, config=RecLLMConfig(mode="zero_shot")).eval()
        torch.testing.assert_close(model(batch).answer_logits, reference(batch).answer_logits, atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_only_plora_parameters_train_and_the_crm_stays_frozen_in_eval_mode(tokenizer):
    model = plora_model(tokenizer, randomize_b=False)
    names = set(model.trainable_parameters())
    assert names and all(".plora_" in n for n in names)
    # 2 layers x (q, v) x (bank A, bank B, gate: norm w/b, proj_in w/b, proj_out w/b)
    assert len(names) == 2 * 2 * 8
    assert not any(p.requires_grad for p in model.crm.parameters())
    assert not any(p.requires_grad for n, p in model.llm.named_parameters() if "plora_" not in n)
    model.train()
    assert model.training and model.llm.training and not model.crm.training
    assert not any(m.training for m in model.crm.modules())

    keep = RecLLM(
        tiny_llama(tokenizer),
        PromptEncoder(tokenizer, "ml-1m").answers,
        tiny_crm(dropout=0.2),
        RecLLMConfig(adapter=PLoRAConfig(crm_dim=16, num_experts=4), crm_train_mode=True),
    )
    keep.train()
    assert keep.crm.training
    keep.eval()
    assert not keep.crm.training


def test_gradients_reach_only_the_adapter_and_match_with_activation_checkpointing(tokenizer):
    encoder = PromptEncoder(tokenizer, "ml-1m")
    batch = make_batch(encoder, [0, 1, 2, 3], with_answer=True)
    grads = []
    for checkpointing in (False, True):
        model = plora_model(tokenizer, gradient_checkpointing=checkpointing).train()
        with model.routing(batch):  # backward inside: checkpointed layers recompute with the gates
            loss = model(batch).loss
            loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is None for p in model.crm.parameters())
        trainable = model.trainable_parameters()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
        grads.append({n: p.grad.clone() for n, p in trainable.items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_last_logits_and_their_gradients_equal_the_full_logits_sliced(tokenizer):
    """The index-tensor head (one GEMM) against every position's logits cut to the last K, loss and grads."""
    encoder = PromptEncoder(tokenizer, "ml-1m")
    batch = make_batch(encoder, [0, 1, 2, 3], with_answer=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    keep = 3
    results = []
    for cut in ("last_logits", "full"):
        model = plora_model(tokenizer).train()
        with model.routing(batch):
            if cut == "last_logits":
                logits = last_logits(model.llm, ids, mask, keep)
            else:
                logits = model.llm(
                    input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
                ).logits[:, -keep:]
            loss = answer_loss(logits, batch["labels"][:, -keep:])
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.trainable_parameters().items()}
        results.append((logits.detach(), loss.detach(), grads))
    (ours, our_loss, our_grads), (want, want_loss, want_grads) = results
    assert ours.shape == (4, keep, want.shape[-1])
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_loss, want_loss, atol=1e-6, rtol=1e-6)
    assert any(g.abs().max() > 0 for g in want_grads.values())
    for name, grad in want_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-6, rtol=1e-5)


def test_forward_refuses_another_batch_than_the_routed_one(tokenizer):
    encoder = PromptEncoder(tokenizer, "ml-1m")
    model = plora_model(tokenizer)
    with model.routing(make_batch(encoder, [0, 1], True)), pytest.raises(RuntimeError, match="another batch"):
        model(make_batch(encoder, [2, 3], True))


def test_gate_weights_are_per_sample_distributions(tokenizer):
    encoder = PromptEncoder(tokenizer, "ml-1m")
    model = plora_model(tokenizer)
    alpha = model.gate_weights(make_batch(encoder, [0, 1, 2], True))
    assert alpha.shape == (4, 3, 4)  # [G, B, N]: a gate per adapted projection
    torch.testing.assert_close(alpha.sum(-1), torch.ones(4, 3))


def test_lora_mode_is_peft_lora_on_q_and_v(tokenizer):
    encoder = PromptEncoder(tokenizer, "ml-1m")
    model = RecLLM(tiny_llama(tokenizer), encoder.answers, config=RecLLMConfig(mode="lora", lora_rank=4))
    names = sorted(model.trainable_parameters())
    assert len(names) == 2 * 2 * 2 and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names} == {"q_proj", "v_proj"}
    assert model.crm is None
    batch = make_batch(encoder, [0, 1], True)
    base = RecLLM(tiny_llama(tokenizer), encoder.answers, config=RecLLMConfig(mode="zero_shot"))
    with torch.no_grad():  # peft's B starts at 0 too
        torch.testing.assert_close(model(batch).p_yes, base(batch).p_yes, atol=1e-6, rtol=0)
    model(batch).loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters().values())
    zero_shot = RecLLM(tiny_llama(tokenizer), encoder.answers, config=RecLLMConfig(mode="zero_shot"))
    assert not zero_shot.trainable_parameters()


def test_8bit_loading_on_cpu_or_a_clear_error_without_bitsandbytes(tokenizer, tmp_path, monkeypatch):
    import sys

    tiny_llama(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    llm, tok = load_causal_lm(str(tmp_path))
    assert isinstance(llm, LlamaForCausalLM) and not llm.training and tok.chat_template == CHAT_TEMPLATE
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:  # bitsandbytes' CPU backend: every decoder Linear holds int8 weights, the outputs stay close
        int8, _ = load_causal_lm(str(tmp_path), load_in_8bit=True, with_tokenizer=False)
        assert int8.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
        ids = tok(["Heat (1995) Toy Story (1995)"], return_tensors="pt").input_ids
        with torch.no_grad():
            # int8 rows keep ~2 decimal digits: logits of the 2-layer toy model move by a few 1e-2 at most
            torch.testing.assert_close(int8(ids).logits, llm(ids).logits, atol=0.05, rtol=0)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(LLMLoadError, match="load_in_8bit=true: bitsandbytes is not installed"):
        load_causal_lm(str(tmp_path), load_in_8bit=True)


def test_plora_needs_a_crm_of_the_right_width(tokenizer):
    answers = PromptEncoder(tokenizer, "ml-1m").answers
    with pytest.raises(ValueError, match="needs the CRM"):
        RecLLM(tiny_llama(tokenizer), answers, None, RecLLMConfig())
    with pytest.raises(ValueError, match="crm_dim=256 but the CRM's d_c is 16"):
        RecLLM(tiny_llama(tokenizer), answers, tiny_crm(), RecLLMConfig())
