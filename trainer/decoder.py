"""All objects of a step through ONE prompt-encoder and ONE mask-decoder call, with an index into the images.

``MaskDecoder.predict_masks`` takes one image and ``P`` prompts: it ``repeat_interleave``s the image embedding
and the positional encoding ``P`` times and then adds the dense prompt. Here the decoder's own components
(``transformer``, ``output_upscaling``, ``output_hypernetworks_mlps``, ``iou_prediction_head``) are called on
``B`` images and ``P`` objects at once, with ``image_index`` saying which image each object belongs to:

- the positional encoding is never copied: it is passed as ``(1, 256, 64, 64)`` and the two-way transformer
  broadcasts it in its additions;
- the image embedding IS copied once per object, in ``embeddings.index_select(0, image_index)`` fused with the
  dense-prompt addition. This copy cannot be avoided: the two-way transformer updates the image tokens with
  each object's prompt tokens (token-to-image attention writes ``keys``), so every object needs its own
  ``(256, 64, 64)`` working copy. It is the same single allocation SAM makes for ``src``; SAM's extra
  ``repeat_interleave`` of the embedding and of the positional encoding are gone.

The results equal ``MaskDecoder.forward`` on each image separately (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn

from trainer.prompts import BOX_BR, BOX_TL, NEG, PAD, POS, Prompts


def embed_prompts(pe: PromptEncoder, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse and dense prompt embeddings of ``P`` objects with mixed prompt kinds, in one batched pass.

    Each object gets the tokens SAM's ``PromptEncoder`` gives it alone: its clicks, then its box corners
    (a box alone is ``[TL, BR]``), and one padding token after clicks without a box (``[click, PAD]``).
    A batch needs one token count, so objects with fewer tokens than the longest get more padding after
    theirs; padding slots between clicks (an object with fewer clicks than another) move after its real
    tokens. The decoder's outputs do not depend on the order of the sparse tokens (they carry no position
    index), so this is SAM's prompt exactly wherever the objects' own token counts agree: boxes beside
    single clicks, boxes + k clicks beside k + 1 clicks (the training rounds). Training then sees the
    prompts evaluation and ``SamPredictor`` give (tested against ``PromptEncoder`` per object, equal to
    float32 rounding: a batch of another shape may round the positional encoding's matmul differently).

    Returns:
        sparse ``(P, T, 256)`` with ``T`` the largest per-object token count (clicks + 2 with a box,
        clicks + 1 without), and dense ``(P, 256, 64, 64)`` (a broadcast view of ``no_mask_embed`` where
        there is no mask prompt).
    """
    p = prompts.point_coords.shape[0]
    if prompts.boxes is None:
        corners = prompts.point_coords.new_zeros((p, 1, 2))
        corner_labels = torch.full((p, 1), PAD, device=corners.device)
        has_box = torch.zeros(p, dtype=torch.bool, device=corners.device)
    else:
        corners = prompts.boxes.reshape(p, 2, 2)
        corner_labels = torch.tensor([BOX_TL, BOX_BR], device=corners.device).expand(p, 2)
        corner_labels = torch.where(prompts.has_box[:, None], corner_labels, PAD)
        has_box = prompts.has_box
    coords = torch.cat([prompts.point_coords, corners], 1) + 0.5  # SAM embeds pixel centres
    labels = torch.cat([prompts.point_labels, corner_labels], 1)
    coords, labels = _padding_last(coords, labels, has_box)
    sparse = pe.pe_layer.forward_with_coords(coords, pe.input_image_size)
    sparse = torch.where((labels == PAD)[..., None], pe.not_a_point_embed.weight, sparse)
    # SAM's learned embedding of each label: 4 adds, not a loop over objects
    for k in (NEG, POS, BOX_TL, BOX_BR):
        sparse = sparse + (labels == k)[..., None] * pe.point_embeddings[k].weight
    h, w = pe.image_embedding_size
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(p, -1, h, w)
    if prompts.mask_input is not None:
        masked = pe.mask_downscaling(prompts.mask_input)  # what PromptEncoder's mask branch runs
        has = prompts.has_mask
        dense = masked if has is None else torch.where(has[:, None, None, None], masked, dense)
    return sparse, dense


def _padding_last(
    coords: torch.Tensor, labels: torch.Tensor, has_box: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, M, 2)`` coords and ``(P, M)`` labels with each object's real tokens first (in their order) and
    its padding after, cut to the longest object's count: real tokens + 1 padding token without a box."""
    if labels.shape[0] == 0:
        return coords, labels
    pad = labels == PAD
    order = torch.argsort(pad.to(torch.uint8), dim=1, stable=True)
    count = int(((~pad).sum(1) + (~has_box).long()).max())
    labels = labels.gather(1, order)[:, :count]
    coords = coords.gather(1, order[..., None].expand(-1, -1, 2))[:, :count]
    return coords, labels


def decode(
    md: MaskDecoder,
    embeddings: torch.Tensor,
    image_index: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    output_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder on ``P`` objects of ``B`` images in one call.

    Args:
        md: the mask decoder whose components run.
        embeddings: ``(B, 256, 64, 64)`` image embeddings.
        image_index: ``(P,)`` int64, the image of each object.
        image_pe: ``(1, 256, 64, 64)`` dense positional encoding (``PromptEncoder.get_dense_pe()``).
        sparse: ``(P, T, 256)`` prompt tokens.
        dense: ``(P, 256, 64, 64)`` dense prompt embeddings.
        output_tokens: ``(K, 256)`` output tokens; default SAM's IoU token and 4 mask tokens.

    Returns:
        masks ``(P, 4, 256, 256)`` low-res logits (SAM's single-mask output is index 0, the multimask outputs
        1..3) and iou ``(P, 4)`` predicted IoU.
    """
    if output_tokens is None:
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], 1)
    # the one per-object copy of the embedding (see the module docstring), fused with the dense prompt
    src = torch.add(embeddings.index_select(0, image_index).to(dense.dtype), dense)
    p, c, h, w = src.shape
    hs, src = md.transformer(src, image_pe, tokens)  # image_pe broadcasts over objects: no copy
    upscaled = md.output_upscaling(src.transpose(1, 2).reshape(p, c, h, w))
    return hs, upscaled


def instance_head(
    md: MaskDecoder, hs: torch.Tensor, upscaled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's heads on the decoder outputs: ``(P, 4, 256, 256)`` mask logits and ``(P, 4)`` predicted IoU."""
    n = md.num_mask_tokens
    hyper = torch.stack([md.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(n)], 1)
    p, c, h, w = upscaled.shape
    masks = (hyper @ upscaled.reshape(p, c, h * w)).reshape(p, n, h, w)
    return masks, md.iou_prediction_head(hs[:, 0])


class Decoded(NamedTuple):
    """What ``PromptedDecoder`` returns, in both tasks."""

    logits: torch.Tensor
    """``(P, K, 256, 256)`` low-res logits: SAM's 4 masks (K = 4; the single-mask output is index 0, the
    multimask outputs 1..3), one map per class with a semantic head (K = C), or the 3 maps of an AIS head
    (``trainer.ais``; P = B images, no prompts)."""
    iou: torch.Tensor | None
    """``(P, 4)`` predicted IoU of SAM's masks; ``None`` with a semantic head, which has no IoU token."""

    def shown(self, multimask: torch.Tensor) -> torch.Tensor:
        """``(P, 256, 256)`` logits of the mask a user would see: for ``(P,)`` bool ``multimask`` objects the
        multimask output the IoU head rates best (as ``SamPredictor`` users pick), else the single-mask
        output 0."""
        best = self.iou[:, 1:].argmax(1) + 1
        pick = torch.where(multimask, best, torch.zeros_like(best))
        return self.logits[torch.arange(pick.shape[0], device=pick.device), pick]


Refine = Callable[[int, Decoded, Prompts], "Prompts | None"]
"""``PromptedDecoder.forward``'s interactive rounds: ``(round, its Decoded, its prompts) -> next prompts``."""


class PromptedDecoder(nn.Module):
    """What trains and what predicts: SAM's prompt encoder and mask decoder, and the slots the variants
    (``trainer.variants``) fill: a head with its own output tokens (the semantic head) and an encoder tail.

    The image encoder is not part of it: training reads its outputs from the cache and never runs it. With
    an ``encoder_tail`` (``trainer.encoder_tail``: the encoder's last blocks and neck, with adapters) the
    cache gives the tokens entering those blocks instead, and the tail turns them into the embeddings,
    once per image per call, inside ``forward`` (so DDP sees its parameters). Evaluation, the overlays and
    the Predictor predict through ``forward``'s two halves, ``image_embeddings`` and ``decode_prompts``.

    The slots are registered in a fixed order (``semantic_head``, ``encoder_tail``, then ``ais_head``, the
    AIS task's prompt-free head, ``trainer.ais``) whether filled or not, so that the parameter order, and
    with it the optimiser state of a checkpoint, does not depend on the order in which variants fill them;
    ``semantic_head`` keeps its name for the checkpoints' keys.
    """

    def __init__(
        self,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        semantic_head=None,
        encoder_tail=None,
        ais_head=None,
    ):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_module("semantic_head", semantic_head)
        self.register_module("encoder_tail", encoder_tail)
        self.register_module("ais_head", ais_head)

    def forward(
        self,
        embeddings: torch.Tensor,
        image_index: torch.Tensor,
        prompts: Prompts | None,
        refine: Refine | None = None,
    ) -> Decoded | list[Decoded]:
        """``P`` objects of ``B`` images through one prompt-encoder and one mask-decoder call per round:
        ``decode_prompts(image_embeddings(embeddings), ...)``.

        Args:
            embeddings: ``(B, 256, 64, 64)`` image embeddings; with an encoder tail, the ``(B, 64, 64, C)``
                tap tokens it turns into them (once, however many rounds).
            image_index: ``(P,)`` int64, the image of each object (semantic mode: ``arange(B)``).
            prompts: the prompts of the ``P`` objects, or ``None`` for none at all (a prompt-free semantic
                head: no sparse tokens, SAM's no-mask dense embedding; an AIS head: the head alone reads the
                ``B`` embeddings and ``image_index`` must be ``arange(B)``).
            refine: interactive rounds inside this one forward (so that DDP sees one forward per backward,
                however many rounds): called as ``refine(round, decoded, prompts)`` after each round, it gives
                the next round's prompts, or ``None`` to stop.

        Returns:
            the ``Decoded`` of the prompts; with ``refine``, the list of every round's ``Decoded``.

        One ``forward`` for both tasks, so that DDP wraps either.
        """
        return self.decode_prompts(self.image_embeddings(embeddings), image_index, prompts, refine)

    def image_embeddings(self, inputs: torch.Tensor) -> torch.Tensor:
        """What the store gives -> ``(B, 256, 64, 64)`` image embeddings: the embeddings themselves, or, with
        an encoder tail, the ``(B, 64, 64, C)`` tap tokens run through it."""
        return inputs if self.encoder_tail is None else self.encoder_tail(inputs)

    def decode_prompts(
        self,
        embeddings: torch.Tensor,
        image_index: torch.Tensor,
        prompts: Prompts | None,
        refine: Refine | None = None,
    ) -> Decoded | list[Decoded]:
        """``forward`` on ``(B, 256, 64, 64)`` image embeddings (``image_embeddings``' output): callers that
        decode one image's objects in chunks embed the image once."""
        if prompts is None and self.ais_head is not None:  # (B, 3, 256, 256) AIS map logits, no decoder
            return Decoded(self.ais_head(embeddings), None)
        if refine is None:
            return self._decode(embeddings, image_index, prompts)
        rounds = []
        while prompts is not None:
            rounds.append(self._decode(embeddings, image_index, prompts))
            prompts = refine(len(rounds) - 1, rounds[-1], prompts)
        return rounds

    def _decode(
        self, embeddings: torch.Tensor, image_index: torch.Tensor, prompts: Prompts | None
    ) -> Decoded:
        """One round of ``forward`` on the image embeddings."""
        pe = self.prompt_encoder
        if prompts is None:
            sparse = embeddings.new_zeros((image_index.shape[0], 0, pe.embed_dim)).float()
            h, w = pe.image_embedding_size
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(image_index.shape[0], -1, h, w)
        else:
            sparse, dense = embed_prompts(pe, prompts)
        head = self.semantic_head
        tokens = None if head is None else head.class_tokens
        hs, upscaled = decode(
            self.mask_decoder, embeddings, image_index, pe.get_dense_pe(), sparse, dense, tokens
        )
        if head is None:
            return Decoded(*instance_head(self.mask_decoder, hs, upscaled))
        return Decoded(head(hs, upscaled), None)
