"""Training data: samples of the ``docs/data-format.md`` layout -> tokenized, preprocessed, batched -> padded LLM
inputs with labels, and the loss.

- :func:`tokenize_conversation`: ChatML ids with ``<image>`` / ``<speech>`` placeholders moved to the start of the
  human turn (Ola's preprocess) and labels on assistant content plus the ``<|im_start|>``, ``<|im_end|>`` and
  ``"\\n"`` markers of assistant turns (``IGNORE_INDEX`` elsewhere).
- :class:`StageDataset`: the stage's data mix; media decoded with ``ola_model.processing``; every sample's LLM length
  estimated from media headers with ``ola_model.tokens`` (for length grouping and the ``max_length`` filter).
- :class:`LengthGroupedBatches`: deterministic, resumable, per-rank micro-batches of similar lengths.
- :func:`build_inputs`: encoder blocks spliced in Ola's order (image/video blocks fill the first placeholders,
  speech the rest), right padding, position ids, labels. :func:`lm_loss`: token-mean cross entropy.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ola_model.config import OlaConfig
from ola_model.model import OlaModel
from ola_model.processing.audio import SAMPLE_RATE, AudioFeatures, load_audio, process_audio
from ola_model.processing.image import ImageViews, load_image, process_image_within
from ola_model.processing.video import load_video
from ola_model.prompt import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    SPEECH_PLACEHOLDER,
    SYSTEM_PROMPT,
    assemble_embeddings,
    tokenize_prompt,
)
from ola_model.tokenizer import IM_END, IM_START
from ola_model.tokens import audio_num_tokens, image_num_tokens, video_num_tokens
from workflows.data.dataset import load_split

log = logging.getLogger(__name__)

ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


class DataError(ValueError):
    """A dataset or sample is malformed; the message names the file or sample id."""


# --------------------------------------------------------------------------------------------------- tokenization
def move_placeholders_to_front(value: str) -> str:
    """Ola's training layout of a human turn: each placeholder kind is cut out and put in front with a newline.

    Images first, then speech (so speech ends up first): ``<speech><image>\\nQ`` -> ``<speech>\\n<image>\\n\\nQ``;
    ``<image>\\nQ`` and ``<speech>\\nQ`` are unchanged. Each ``<image>`` is repeated with its newline.
    """
    for marker in (IMAGE_PLACEHOLDER, SPEECH_PLACEHOLDER):
        count = value.count(marker)
        if count:
            value = (marker + "\n") * count + value.replace(marker, "").strip()
    return value


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def tokenize_conversation(
    conversations: Sequence[dict],
    tokenizer,
    system: str = SYSTEM_PROMPT,
    label_all_turn_markers: bool = False,
) -> tuple[list[int], list[int]]:
    """ChatML token ids and labels of one conversation.

    Each turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, every piece tokenized on its own (as Ola's training
    does). Labels are ``IGNORE_INDEX`` except the assistant content and the ``<|im_start|>``, ``<|im_end|>`` and the
    two ``"\\n"`` marker tokens of assistant turns (with ``label_all_turn_markers``: of every turn, like Ola's code).
    Placeholders become ``IMAGE_TOKEN_INDEX`` / ``SPEECH_TOKEN_INDEX`` and are never labelled.

    Returns:
        (input_ids, labels) of equal length.
    Raises:
        DataError: an unknown role, or a placeholder in an assistant turn.
    """
    im_start, im_end = tokenizer.convert_tokens_to_ids(IM_START), tokenizer.convert_tokens_to_ids(IM_END)
    nl = _ids(tokenizer, "\n")
    ids: list[int] = []
    labels: list[int] = []

    def turn(role: str, content_ids: list[int], supervised: bool) -> None:
        role_ids = _ids(tokenizer, role)
        markers = supervised or label_all_turn_markers
        ids.extend([im_start, *role_ids, *nl, *content_ids, im_end, *nl])
        labels.extend([im_start] if markers else [IGNORE_INDEX])
        labels.extend([IGNORE_INDEX] * len(role_ids))
        labels.extend(nl if markers else [IGNORE_INDEX] * len(nl))
        labels.extend(content_ids if supervised else [IGNORE_INDEX] * len(content_ids))
        labels.extend([im_end, *nl] if markers else [IGNORE_INDEX] * (1 + len(nl)))

    turns = list(conversations)
    if turns and ROLES.get(turns[0].get("from", turns[0].get("role"))) == "assistant":
        turns = turns[1:]  # Ola drops a leading assistant turn
    turn("system", _ids(tokenizer, system), supervised=False)
    for t in turns:
        speaker = t.get("from", t.get("role"))
        if speaker not in ROLES:
            raise DataError(f"conversation turn has role {speaker!r}; expected one of {sorted(ROLES)}")
        role, value = ROLES[speaker], str(t.get("value", t.get("content", "")))
        if role == "user":
            turn("user", tokenize_prompt(move_placeholders_to_front(value), tokenizer), supervised=False)
        else:
            if IMAGE_PLACEHOLDER in value or SPEECH_PLACEHOLDER in value:
                raise DataError("an assistant turn contains a media placeholder")
            turn("assistant", _ids(tokenizer, value), supervised=True)
    return ids, labels


# ---------------------------------------------------------------------------------------------------- the dataset
@dataclass
class SampleSpec:
    """One sample's text and media, parsed and checked (no media decoded)."""

    sample_id: str
    task: str
    conversations: list[dict]
    images: list[Path] = field(default_factory=list)
    video: Path | None = None
    audio: Path | None = None  # an audio file (``audio`` or ``audio_q``)
    video_audio: bool = False  # the speech placeholder takes the video's own audio track


def mix_samples(samples: Sequence[dict], mix: dict[str, float], seed: int = 0) -> list[dict]:
    """Draw a stage's data mix: for task t with weight w, round(w * n_t) samples (w <= 1: a random subset;
    w > 1: every sample floor(w) times plus a random subset for the rest).

    Raises:
        DataError: a task of the mix has no samples (the message lists the tasks there are).
    """
    by_task: dict[str, list[dict]] = {}
    for s in samples:
        by_task.setdefault(str(s.get("task")), []).append(s)
    rng = random.Random(seed)
    out: list[dict] = []
    for task, weight in mix.items():
        pool = by_task.get(task)
        if not pool:
            raise DataError(f"data mix task {task!r} has no samples; tasks present: {sorted(by_task)}")
        want = max(1, round(weight * len(pool)))
        out.extend(pool * (want // len(pool)))
        out.extend(rng.sample(pool, want % len(pool)))
    return out


def parse_sample(raw: dict, root: Path) -> SampleSpec:
    """Check one sample's placeholders against its media keys.

    Raises:
        DataError: naming the sample id: missing conversations, placeholder counts that do not match the media.
    """
    sid = str(raw.get("id", "?"))
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"sample {sid}: no conversations")
    human = "".join(str(t.get("value", "")) for t in convs if ROLES.get(t.get("from")) == "user")
    n_img, n_sp = human.count(IMAGE_PLACEHOLDER), human.count(SPEECH_PLACEHOLDER)
    images = raw.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    spec = SampleSpec(sample_id=sid, task=str(raw.get("task", "")), conversations=convs)
    spec.images = [root / p for p in images]
    spec.video = root / raw["video"] if raw.get("video") else None
    if spec.video is not None and spec.images:
        raise DataError(f"sample {sid}: has both image and video; a sample takes one or the other")
    audio = raw.get("audio") or raw.get("audio_q")
    spec.audio = root / audio if audio else None
    n_vision = len(spec.images) + (spec.video is not None)
    if n_img != n_vision:
        raise DataError(f"sample {sid}: {n_img} {IMAGE_PLACEHOLDER} placeholder(s) for {n_vision} image/video input(s)")
    if n_sp > 1:
        raise DataError(f"sample {sid}: {n_sp} {SPEECH_PLACEHOLDER} placeholders; a sample has at most one audio")
    if n_sp == 1 and spec.audio is None:
        if spec.video is None:
            raise DataError(f"sample {sid}: a {SPEECH_PLACEHOLDER} placeholder but no audio, audio_q or video")
        spec.video_audio = True
    if n_sp == 0 and spec.audio is not None:
        raise DataError(f"sample {sid}: has audio but no {SPEECH_PLACEHOLDER} placeholder")
    for path in [*spec.images, spec.video, spec.audio]:
        if path is not None and not path.is_file():
            raise DataError(f"sample {sid}: media file {path} does not exist")
    return spec


def _video_probe(path: Path) -> tuple[int, int, int, float]:
    """(width, height, frame count or 0, duration in seconds) from the container headers."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        duration = container.duration / 1e6 if container.duration else 0.0
        return stream.width, stream.height, int(stream.frames or 0), duration


@dataclass
class Example:
    """One preprocessed training sample."""

    sample_id: str
    task: str
    input_ids: list[int]
    labels: list[int]
    images: list[ImageViews]
    video: torch.Tensor | None  # (T, 3, H, W) in [-1, 1]
    audio: AudioFeatures | None
    est_tokens: int


@dataclass
class TrainBatch:
    """A micro-batch: examples of mixed modalities, unpadded (padding happens after media expansion)."""

    examples: list[Example]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def sample_ids(self) -> list[str]:
        return [e.sample_id for e in self.examples]


def collate(examples: list[Example]) -> TrainBatch:
    return TrainBatch(list(examples))


class StageDataset(Dataset):
    """The samples of one stage's data mix, tokenized up front; media are decoded in ``__getitem__``.

    Args:
        root: the dataset directory; split: which split.
        mix: task -> weight (see :func:`mix_samples`).
        tokenizer: the model's tokenizer.
        config: the model config (limits and geometry for media and token estimates).
        max_length: samples whose estimated LLM length exceeds this are dropped (and counted in the log).
        max_video_frames: frames sampled per video.
    """

    def __init__(
        self,
        root: str | Path,
        mix: dict[str, float],
        tokenizer,
        config: OlaConfig,
        *,
        split: str = "train",
        max_length: int = 16384,
        max_video_frames: int = 64,
        seed: int = 0,
        label_all_turn_markers: bool = False,
    ) -> None:
        self.root = Path(root)
        self.config = config
        lim = config.limits
        if max_video_frames > lim.max_video_frames:
            raise DataError(f"max_video_frames {max_video_frames} exceeds the model limit {lim.max_video_frames}")
        self.max_video_frames = max_video_frames
        raw = mix_samples(load_split(self.root, split), mix, seed)  # validated, media paths absolute
        self.specs: list[SampleSpec] = []
        self.tokens: list[tuple[list[int], list[int]]] = []
        self.lengths: list[int] = []
        dropped: list[str] = []
        cache: dict[str, tuple] = {}
        for sample in raw:
            spec = parse_sample(sample, self.root)
            ids, labels = tokenize_conversation(
                spec.conversations, tokenizer, label_all_turn_markers=label_all_turn_markers
            )
            est = self._estimate(spec, len(ids), cache)
            if est > max_length:
                dropped.append(spec.sample_id)
                continue
            self.specs.append(spec)
            self.tokens.append((ids, labels))
            self.lengths.append(est)
        if dropped:
            log.warning("dropped %d sample(s) longer than max_length %d: %s", len(dropped), max_length, dropped[:10])
        if not self.specs:
            raise DataError(f"no sample of the mix {mix} in {self.root} fits max_length {max_length}")
        log.info("dataset %s: %d samples, %d tokens (estimated)", self.root, len(self.specs), sum(self.lengths))

    def _estimate(self, spec: SampleSpec, num_ids: int, cache: dict) -> int:
        """LLM positions after media expansion, from the media headers (``ola_model.tokens``)."""
        cfg, lim = self.config, self.config.limits
        patch, pool = cfg.vision.patch_size, cfg.projector.pool_window
        total = num_ids - len(spec.images) - (spec.video is not None) - (spec.audio is not None or spec.video_audio)
        for path in spec.images:
            if str(path) not in cache:
                with Image.open(path) as img:
                    cache[str(path)] = img.size
            w, h = cache[str(path)]
            total += image_num_tokens(
                w,
                h,
                max_area=lim.max_image_area,
                lowres_area=lim.lowres_area,
                stride=lim.image_stride,
                patch=patch,
                pool=pool,
            )
        if spec.video is not None:
            if str(spec.video) not in cache:
                cache[str(spec.video)] = _video_probe(spec.video)
            w, h, frames, duration = cache[str(spec.video)]
            t = min(self.max_video_frames, frames) if frames else self.max_video_frames
            total += video_num_tokens(
                w,
                h,
                t,
                max_area=lim.video_max_area,
                min_area=lim.video_min_area,
                stride=lim.video_stride,
                patch=patch,
                pool=pool,
            )
            if spec.video_audio:
                total += audio_num_tokens(max(1, round(duration * SAMPLE_RATE)), stack=cfg.projector.speech_ds_rate)
        if spec.audio is not None:
            info = sf.info(str(spec.audio))
            samples = max(1, math.ceil(info.frames * SAMPLE_RATE / info.samplerate))
            total += audio_num_tokens(samples, stack=cfg.projector.speech_ds_rate)
        return total

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> Example:
        spec, lim = self.specs[index], self.config.limits
        ids, labels = self.tokens[index]
        images = [process_image_within(load_image(p), lim) for p in spec.images]
        video, wav = None, None
        if spec.video is not None:
            clip = load_video(
                spec.video,
                max_frames=self.max_video_frames,
                frame_limit=lim.max_video_frames,
                max_area=lim.video_max_area,
                min_area=lim.video_min_area,
                stride=lim.video_stride,
                with_audio=spec.video_audio,
            )
            video = clip.frames
            if spec.video_audio:
                if clip.audio is None:
                    raise DataError(
                        f"sample {spec.sample_id}: {SPEECH_PLACEHOLDER} needs the video's audio track, "
                        f"but {spec.video} has none"
                    )
                wav = clip.audio
        if spec.audio is not None:
            wav = load_audio(spec.audio)
        audio = process_audio(wav, max_chunks=lim.max_audio_chunks) if wav is not None else None
        return Example(spec.sample_id, spec.task, ids, labels, images, video, audio, self.lengths[index])


# ------------------------------------------------------------------------------------------------------ sampling
class LengthGroupedBatches:
    """Per-rank micro-batches, grouped by length, in a deterministic order that a resumed run can re-enter.

    Each epoch shuffles the samples (seed + epoch), pads the order by wrapping around to whole steps of
    ``batch_size * world_size``, and (with ``group_by_length``) sorts each mega-batch of ``mega_steps`` steps by
    estimated length, longest first, so that the ranks of one step get similar lengths (HF's length grouping).
    Step ``s`` of an epoch gives rank ``r`` the slice ``[s * W * b + r * b, ... + b)``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        group_by_length: bool = True,
        mega_steps: int = 50,
    ) -> None:
        if not lengths:
            raise DataError("cannot batch an empty dataset")
        self.lengths = list(lengths)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.group_by_length, self.mega_steps = seed, group_by_length, mega_steps
        step = batch_size * world_size
        self.batches_per_epoch = -(-len(self.lengths) // step)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of dataset indices) of ``epoch``."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        n = len(self.lengths)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        step = self.batch_size * self.world_size
        total = self.batches_per_epoch * step
        order = (order * (-(-total // n)))[:total]
        if self.group_by_length:
            mega = step * self.mega_steps
            chunks = [order[i : i + mega] for i in range(0, total, mega)]
            order = [i for c in chunks for i in sorted(c, key=lambda k: -self.lengths[k])]
        batches = []
        for s in range(self.batches_per_epoch):
            start = s * step + self.rank * self.batch_size
            batches.append(order[start : start + self.batch_size])
        self._epoch_cache = (epoch, batches)
        return batches

    def iter_from(self, micro_step: int = 0) -> Iterator[list[int]]:
        """Micro-batches from global micro-step ``micro_step`` on, across epochs, forever."""
        k = micro_step
        while True:
            epoch, pos = divmod(k, self.batches_per_epoch)
            yield self.epoch_batches(epoch)[pos]
            k += 1


class BatchSamplerFrom:
    """A ``batch_sampler`` for ``DataLoader`` that starts at a micro-step (for resuming)."""

    def __init__(self, batches: LengthGroupedBatches, start: int) -> None:
        self.batches, self.start = batches, start

    def __iter__(self) -> Iterator[list[int]]:
        return self.batches.iter_from(self.start)


# ------------------------------------------------------------------------------------------------ model inputs
@dataclass
class ModelInputs:
    """A padded batch for the decoder."""

    inputs_embeds: torch.Tensor  # (B, L, C)
    attention_mask: torch.Tensor  # (B, L) long, 1 = token
    position_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, IGNORE_INDEX where unsupervised or padding
    aux: torch.Tensor  # scalar 0 * (dummy blocks): keeps every trainable parameter in the graph

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def expand_labels(ids: Sequence[int], labels: Sequence[int], block_lengths: Sequence[int]) -> list[int]:
    """Labels aligned with the expanded sequence: each placeholder becomes ``len(block)`` ignored positions."""
    out: list[int] = []
    blocks = iter(block_lengths)
    for tok, lab in zip(ids, labels, strict=True):
        if tok < 0:
            out.extend([IGNORE_INDEX] * next(blocks))
        else:
            out.append(lab)
    return out


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _dummy_blocks(model: OlaModel, trainable: set[str], need_vision: bool, need_speech: bool) -> list[torch.Tensor]:
    """Zero-weight blocks through the trainable parts a batch does not use (Ola's dummy inputs, §4.5).

    Every rank then produces a gradient for every trainable parameter at every step, so data-parallel gradient
    reduction sees the same parameters on every rank whatever modalities each rank's batch holds.
    """
    dev, out = model.device, []
    if need_vision and trainable & {"vision_tower", "mm_projector"}:
        if "vision_tower" in trainable:
            view = torch.zeros(3, 32, 32, device=dev, dtype=_param_dtype(model.vision_tower))
            out += model.encode_images([(view, view)])
        else:
            proj = model.mm_projector
            feats = torch.zeros(1, 4, proj.proj1.in_features, device=dev, dtype=_param_dtype(proj))
            pooled = proj(feats, 2, 2)[0]  # (2, C)
            out.append(proj.image_block(pooled, pooled))
    if need_speech and trainable & {"whisper", "beats", "speech_projector"}:
        if trainable & {"whisper", "beats"}:
            n_mels = model.config.whisper.num_mel_bins
            out.append(model.encode_audio(torch.zeros(1, 3000, n_mels, device=dev), torch.zeros(1, 480000, device=dev)))
        else:
            proj = model.speech_projector
            feats = torch.zeros(1, proj.ds_rate, proj.linear1.in_features // proj.ds_rate, device=dev)
            out.append(proj(feats.to(_param_dtype(proj))))
    return out


def build_inputs(
    model: OlaModel,
    batch: TrainBatch,
    max_length: int,
    trainable: Sequence[str] = (),
) -> ModelInputs:
    """Encode a batch's media and splice the blocks into its token sequences, right-padded.

    Per sample, image/video blocks fill the first placeholders and the speech block the rest (Ola's order: a
    video with its audio, ``<speech>\\n<image>``, gets the video first). Images of the whole batch go through the
    vision tower as one varlen batch. Frozen encoders run without a graph (see ``trainability``).

    Args:
        model: the Ola model (any device / dtype).
        batch: a micro-batch.
        max_length: the most positions a sample may take; more raises ``LimitError`` (never truncates).
        trainable: the stage's trainable parts (for the dummy blocks).
    Returns:
        :class:`ModelInputs` with ``inputs_embeds`` (B, L, C) in the LLM's dtype.
    """
    dev = model.device
    vt_dtype = _param_dtype(model.vision_tower)
    views = [(im.lowres.to(dev, vt_dtype), im.highres.to(dev, vt_dtype)) for ex in batch.examples for im in ex.images]
    image_blocks = iter(model.encode_images(views) if views else [])
    embeds, label_rows = [], []
    for ex in batch.examples:
        vision = [next(image_blocks) for _ in ex.images]
        if ex.video is not None:
            vision.append(model.encode_video(ex.video.to(dev, vt_dtype)))
        speech = [model.encode_audio(ex.audio.mel.to(dev), ex.audio.wav_chunks.to(dev))] if ex.audio else []
        e = assemble_embeddings(ex.input_ids, vision, speech, lambda t: model.embed_tokens(t.to(dev)), max_length)
        embeds.append(e)
        label_rows.append(expand_labels(ex.input_ids, ex.labels, [b.shape[0] for b in vision + speech]))
    need_vision = not any(ex.images or ex.video is not None for ex in batch.examples)
    need_speech = not any(ex.audio is not None for ex in batch.examples)
    dummies = _dummy_blocks(model, set(trainable), need_vision, need_speech)
    dtype = model.dtype
    B, L, C = len(embeds), max(e.shape[0] for e in embeds), embeds[0].shape[1]
    inputs = torch.zeros(B, L, C, device=dev, dtype=dtype)
    mask = torch.zeros(B, L, device=dev, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, device=dev, dtype=torch.long)
    for i, (e, lab) in enumerate(zip(embeds, label_rows, strict=True)):
        n = e.shape[0]
        inputs[i, :n] = e.to(dtype)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(lab, device=dev)
    positions = torch.arange(L, device=dev).expand(B, L)  # plain sequential positions, padding included
    aux = sum((d.float().sum() * 0.0 for d in dummies), torch.zeros((), device=dev))
    return ModelInputs(inputs, mask, positions, labels, aux)


def lm_loss(model: OlaModel, inputs: ModelInputs) -> tuple[torch.Tensor, int]:
    """Token-mean cross entropy over the supervised positions of the batch (logits only where supervised).

    Returns:
        (loss scalar float32 including the zero-weight ``aux`` term, number of supervised tokens).
    """
    hidden = model.llm.model(
        inputs_embeds=inputs.inputs_embeds,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.position_ids,
        use_cache=False,
    ).last_hidden_state  # (B, L, C)
    targets = inputs.labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return hidden.float().sum() * 0.0 + inputs.aux, 0
    logits = model.llm.lm_head(hidden[:, :-1][keep]).float()  # (N, V)
    return F.cross_entropy(logits, targets[keep]) + inputs.aux, n
