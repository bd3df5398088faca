"""Run groundingdino-py 0.4.0 under transformers 5.

groundingdino's ``BertModelWarper`` calls ``BertModel.get_extended_attention_mask``,
``invert_attention_mask`` and ``get_head_mask``, which transformers 5 removed, and
passes ``head_mask``/``past_key_values`` to an encoder that no longer takes them.
:class:`BertModelWarper` here keeps the same sub-modules (``embeddings``,
``encoder``, ``pooler``), so the parameter names inside a GroundingDINO model stay
``bert.embeddings.*``/``bert.encoder.*``/``bert.pooler.*`` and real checkpoints load.

GroundingDINO's constructor also fetches its tokenizer and BERT from the hub by
name; :func:`build_grounding_dino` hands it locally built ones instead.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import BertModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

# Patching module globals is process-wide: serialise concurrent builds.
_BUILD_LOCK = threading.Lock()


class BertModelWarper(nn.Module):
    """BERT encoder forward that accepts GroundingDINO's per-phrase 3-D attention masks."""

    def __init__(self, bert_model: BertModel) -> None:
        super().__init__()
        self.config = bert_model.config
        self.embeddings = bert_model.embeddings
        self.encoder = bert_model.encoder
        self.pooler = bert_model.pooler

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **unused: Any,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        """``attention_mask``: (batch, seq) or (batch, seq, seq), 1 = attend."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids
        )
        mask = additive_attention_mask(attention_mask, hidden.dtype)
        encoded = self.encoder(hidden, attention_mask=mask)
        sequence = encoded.last_hidden_state
        pooled = self.pooler(sequence) if self.pooler is not None else None
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence, pooler_output=pooled
        )


def additive_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0/1 keep-mask as the (batch, 1, q, k) additive mask the attention layers add.

    Same values as transformers 4's ``get_extended_attention_mask``: 0 where kept,
    the dtype's most negative number where masked.
    """
    if mask.dim() == 3:
        extended = mask[:, None, :, :]
    elif mask.dim() == 2:
        extended = mask[:, None, None, :]
    else:
        raise ValueError(f"attention mask must be 2-D or 3-D, got shape {tuple(mask.shape)}")
    return (1.0 - extended.to(dtype)) * torch.finfo(dtype).min


@contextlib.contextmanager
def _local_text_encoder(tokenizer: PreTrainedTokenizerBase, bert: BertModel) -> Iterator[None]:
    """Make GroundingDINO's constructor use ``tokenizer``/``bert`` and the compatible wrapper."""
    from groundingdino.models.GroundingDINO import groundingdino as gd_module

    loaders = types.SimpleNamespace(
        get_tokenlizer=lambda _name: tokenizer,
        get_pretrained_language_model=lambda _name: bert,
    )
    with _BUILD_LOCK:
        saved = gd_module.get_tokenlizer, gd_module.BertModelWarper
        gd_module.get_tokenlizer, gd_module.BertModelWarper = loaders, BertModelWarper
        try:
            yield
        finally:
            gd_module.get_tokenlizer, gd_module.BertModelWarper = saved


def build_grounding_dino(
    args: Any, backbone: nn.Module, tokenizer: PreTrainedTokenizerBase, bert: BertModel
) -> nn.Module:
    """GroundingDINO from ``args`` (its config namespace) with the given backbone and text encoder.

    Mirrors ``groundingdino.models.GroundingDINO.groundingdino.build_groundingdino``
    except that the backbone and the BERT/tokenizer are passed in rather than built
    or downloaded inside.
    """
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO
    from groundingdino.models.GroundingDINO.transformer import build_transformer

    with _local_text_encoder(tokenizer, bert):
        model = GroundingDINO(
            backbone,
            build_transformer(args),
            num_queries=args.num_queries,
            aux_loss=True,
            iter_update=True,
            query_dim=4,
            num_feature_levels=args.num_feature_levels,
            nheads=args.nheads,
            dec_pred_bbox_embed_share=args.dec_pred_bbox_embed_share,
            two_stage_type=args.two_stage_type,
            two_stage_bbox_embed_share=args.two_stage_bbox_embed_share,
            two_stage_class_embed_share=args.two_stage_class_embed_share,
            num_patterns=args.num_patterns,
            dn_number=0,
            dn_box_noise_scale=args.dn_box_noise_scale,
            dn_label_noise_ratio=args.dn_label_noise_ratio,
            dn_labelbook_size=args.dn_labelbook_size,
            text_encoder_type="local",
            sub_sentence_present=args.sub_sentence_present,
            max_text_len=args.max_text_len,
        )
    return model
