"""Reading WebDataset shards listed in a shard list, and planning who reads what each epoch.

This is the only module that parses tar members. A sample is a run of consecutive tar members sharing a
key (webdataset's rule: the key ends at the first dot of the member name); its identity is
(shard index in the list, position in the shard), where position p is the p-th such run in the tar.
Positions never move: a sample skipped under `on_error="skip"` still uses up its position.

Epoch plan (`plan_epoch`): the shards are put in an order drawn from `np.random.default_rng([seed, epoch])`
and laid end to end; that sequence is cut into `world_size` contiguous runs, one per rank, at block
boundaries (a block is `block` consecutive positions of one shard starting at a multiple of `block`; a
shard's last block may be short), each run as close as a block allows to an equal share. Every rank is then
padded up to `rank_sample_count(...)` samples by repeating the start of the epoch's sequence, flagged
`padded=True`, like torch's DistributedSampler. That count does not depend on the epoch, so a trainer
takes the same number of steps every epoch. A rank's run (padding included) is cut the same way into
`num_workers` contiguous runs, without padding. Within a shard, positions are always read in order.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, NamedTuple
from urllib.parse import urlparse

import numpy as np
import simplejpeg
from PIL import Image
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from pipeline import storage

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
ON_ERROR = ("raise", "skip")


class ShardError(ValueError):
    """A shard, a shard list or a source tree is unusable; the message names the file, the sample key
    (where there is one) and what to do about it."""


@dataclass(frozen=True, slots=True)
class Sample:
    shard: int  # index of the shard in the shard list
    pos: int  # position of the sample in its shard
    key: str
    image: np.ndarray | bytes  # (H, W, 3) uint8 RGB pixels (`decode_image`), or the member's bytes with decode=False
    label: int
    padded: bool = False  # a repeat that only evens out rank counts (see plan_epoch)


class ShardEntry(NamedTuple):
    url: str  # resolved: a local path or a URL gopen opens
    samples: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ShardList:
    """The shards to read, as a shard list names them (`pipeline.shards` reads, writes and checks the file)."""

    path: str
    classes: tuple[str, ...]
    shards: tuple[ShardEntry, ...]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)


class Span(NamedTuple):
    """Positions [start, stop) of one shard, read in order."""

    shard: int
    start: int
    stop: int
    padded: bool = False


# --------------------------------------------------------------------------------------------- reading


def _groups(url: str, checksum: str | None = None, digest: list | None = None
            ) -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """Yield (key, {suffix: bytes}, problems) per run of members sharing a key, in tar order.

    webdataset's `group_by_keys` is not used because it raises at the first duplicate member, so a skip
    policy could not go on reading with positions intact; here a bad group stays a position and carries
    its problems. Structural damage (unreadable or truncated tar) raises ShardError.

    The bytes are hashed as they stream past; read to the end, the shard's sha256 is appended to `digest` and
    compared with `checksum` (a sha256 hex digest, or `etag:<value>`: the store's own checksum, compared before
    reading). A shard read only in part is not checked."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file") and not os.path.isfile(storage.local_path(url)):
        raise ShardError(f"shard {url} does not exist: restore the file, or rebuild the shard list with "
                         f"`make shardlist` so it lists only shards that exist")
    if checksum and checksum.startswith("etag:"):
        _check_etag(url, checksum)
        checksum = None
    key, members, problems = None, {}, []
    try:
        with storage.HashingReader(storage.open_stream(url)) as stream:
            for member in tar_file_iterator(stream):
                prefix, suffix = base_plus_ext(member["fname"])
                if prefix is None:  # no dot in the name: not part of any sample (webdataset ignores it too)
                    continue
                suffix = suffix.lower()
                if prefix != key:
                    if key is not None:
                        yield key, members, problems
                    key, members, problems = prefix, {}, []
                if suffix in members:
                    problems.append(f"has two `{suffix}` members: keep one")
                members[suffix] = member["data"]
            stream.drain()  # the tar's end-of-archive padding
    except FileNotFoundError:
        raise ShardError(f"shard {url} does not exist: restore it, or fix the data spec (data.train / data.val) "
                         f"so it names only shards that exist") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        where = f" after sample {key!r}" if key is not None else ""
        raise ShardError(f"shard {url} is truncated or not a tar file (reading failed{where}: "
                         f"{str(e).split(' @ ')[0]}): copy it again or rebuild it") from None
    except storage.StorageError as e:
        raise ShardError(str(e)) from None
    if checksum and stream.hexdigest() != checksum:
        raise ShardError(f"shard {url} has sha256 {stream.hexdigest()}, but {checksum} was recorded when the shards "
                         f"were listed: the shard changed since. Restore the original shard, or, if the new one is "
                         f"meant, list the shards again (`make shardlist`, or delete the scan kept beside the "
                         f"cache, <cache.path>.shards/) and write a new cache: the old one was made from other data")
    if digest is not None:
        digest.append(stream.hexdigest())
    if key is not None:
        yield key, members, problems


def _check_etag(url: str, recorded: str) -> None:
    try:
        now = storage.store_checksum(url)
    except FileNotFoundError:
        raise ShardError(f"shard {url} does not exist: restore it, or list the shards again") from None
    if now != recorded:
        raise ShardError(f"shard {url} has the store checksum {now}, but {recorded} was recorded when the shards "
                         f"were listed: the object changed since. Restore the original, or, if the new one is meant, "
                         f"list the shards again (delete the scan kept beside the cache, <cache.path>.shards/) and "
                         f"write a new cache")


def _label(members: dict[str, bytes]) -> tuple[int | None, str | None]:
    """The class id in the `cls` member, or (None, what is wrong)."""
    if "cls" not in members:
        return None, "has no `cls` member: add a <key>.cls member holding the class id as ASCII digits"
    text = members["cls"].decode("ascii", errors="replace").strip()
    try:
        return int(text), None
    except ValueError:
        return None, f"has `cls` {text[:20]!r}, not an integer class id: write the class id as ASCII digits"


JPEG_SOI = b"\xff\xd8"  # a JPEG's first two bytes


def decode_image(data: bytes) -> np.ndarray:
    """The RGB pixels of an encoded image, an (H, W, 3) uint8 array: the one decode of every stage.

    JPEGs in YCbCr or greyscale are decoded by simplejpeg (libjpeg-turbo with PIL's settings: accurate integer
    IDCT, fancy upsampling) straight into an array, the same pixels as PIL's decoder and `convert("RGB")` (the
    tests compare them) at about 0.7 of PIL's decode time; the renderer then hands PIL only a view's crop box.
    Other images (PNG, WebP, CMYK JPEGs, JPEGs libjpeg-turbo refuses or warns about) are decoded by PIL and
    converted to RGB. Raises PIL's error (OSError) for bytes that are not an image."""
    if data[:2] == JPEG_SOI:
        try:
            if simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray"):
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:  # what libjpeg-turbo refuses (or only warns about), PIL may still read, or explain
            pass
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _image(members: dict[str, bytes], decode: bool) -> tuple[np.ndarray | bytes | None, str | None]:
    found = [s for s in IMAGE_SUFFIXES if s in members]
    if not found:
        return None, f"has no image member (one of {', '.join(IMAGE_SUFFIXES)}; members: {sorted(members)})"
    if len(found) > 1:
        return None, f"has several images ({', '.join(found)}): keep one"
    data = members[found[0]]
    if not decode:
        return data, None
    try:
        return decode_image(data), None
    except Exception as e:  # PIL raises many types for bad bytes (UnidentifiedImageError, OSError, SyntaxError...)
        return None, f"has `{found[0]}` bytes that do not decode as an image ({e}): re-encode or remove the sample"


def scan_shard(url: str, digest: list | None = None) -> list[tuple[str, int | None]]:
    """(key, label or None where `cls` is missing or not an integer) for every position of a shard; the
    shard's sha256, taken in the same pass, is appended to `digest`.

    Used to build shard lists; it does not decode images. A run of members holding one suffix twice is
    refused: it is two samples in a row under one key (or one sample with a member twice), and counting it as
    one sample would shift every later position."""
    scanned = []
    for key, members, problems in _groups(url, digest=digest):
        if problems:  # grouping finds only repeated members
            raise ShardError(f"shard {url}: sample {key!r} (position {len(scanned)}) {problems[0].split(':')[0]}: "
                             f"two samples in a row share the key {key!r}, or one sample holds a member twice. "
                             f"Give every sample its own key (rename the members of one of them) and rebuild the shard")
        scanned.append((key, _label(members)[0]))
    return scanned


def read_shard(shardlist: ShardList, shard_index: int, *, start: int = 0, stop: int | None = None,
               decode: bool = True, on_error: str = "raise", skipped: list | None = None) -> Iterator[Sample]:
    """Yield the samples at positions [start, stop) of shard `shard_index`, in order.

    A bad sample (undecodable image, no or non-integer `cls`, label outside the class map, duplicate key,
    duplicate member) raises ShardError with on_error="raise"; with "skip" it is left out, still uses up its
    position, and (shard url, key, reason) is appended to `skipped`. Missing, truncated, empty or recounted
    shards always raise. Reading to the shard's end also checks the sample count against the list."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} is not one of {list(ON_ERROR)}")
    if not 0 <= shard_index < len(shardlist.shards):
        raise IndexError(f"shard index {shard_index} is outside {shardlist.path} ({len(shardlist.shards)} shards)")
    url, expected = shardlist.shards[shard_index].url, shardlist.shards[shard_index].samples
    checksum = shardlist.shards[shard_index].sha256
    stop = expected if stop is None else stop
    if not 0 <= start <= stop <= expected:
        raise IndexError(f"positions [{start}, {stop}) are outside shard {url} ({expected} samples in {shardlist.path})")
    num_classes = len(shardlist.classes)
    first_seen: dict[str, int] = {}
    groups = _groups(url, checksum)
    following = next(groups, None)
    if following is None:
        raise ShardError(f"shard {url} is empty (no samples): remove it and rebuild the shard list with `make shardlist`")
    for pos in itertools.count():
        if following is None:
            return
        key, members, problems = following
        if pos >= expected:
            raise ShardError(f"shard {url} has more samples than the {expected} that {shardlist.path} lists "
                             f"(sample {key!r} at position {pos}): the shard changed; rebuild the list with `make shardlist`")
        if pos >= stop:
            return
        following = next(groups, None)  # looked at first, so a cut-off last sample reports the cut, not its content
        if following is None and pos + 1 < expected:
            raise ShardError(f"shard {url} ends after {pos + 1} samples (last key {key!r}) but {shardlist.path} lists "
                             f"{expected}: the shard is truncated or changed; copy it again, or rebuild the list "
                             f"with `make shardlist`")
        if key in first_seen:
            problems.append(f"repeats the key of position {first_seen[key]}: keys must be unique in a shard")
        first_seen.setdefault(key, pos)
        if pos < start:
            continue
        label, problem = _label(members)
        if label is not None and not 0 <= label < num_classes:
            problem = (f"has label {label}, outside the class map ({num_classes} classes, ids 0..{num_classes - 1}): "
                       f"fix the `cls` member or the shard list's `classes`")
        image, image_problem = _image(members, decode)
        problems += [p for p in (problem, image_problem) if p]
        if problems:
            reason = "; ".join(problems)
            if on_error == "raise":
                raise ShardError(f"shard {url}: sample {key!r} (position {pos}) {reason} "
                                 f"(or pass on_error=skip / data.on_error=skip to skip bad samples)")
            if skipped is not None:
                skipped.append((url, key, reason))
            continue
        yield Sample(shard_index, pos, key, image, label)


# --------------------------------------------------------------------------------------------- planning


def _check_plan_args(epoch: int, seed: int, world_size: int, num_workers: int, block: int) -> None:
    for name, value, low in (("epoch", epoch, 0), ("seed", seed, 0), ("world_size", world_size, 1),
                             ("num_workers", num_workers, 1), ("block", block, 1)):
        if value < low:
            raise ValueError(f"{name}={value} must be at least {low}")


def rank_sample_count(shardlist: ShardList, world_size: int, block: int = 1) -> int:
    """Samples every rank gets per epoch (padding included), the same for every epoch.

    A rank's cut points move by less than a block from the exact share, so no rank holds more than
    ceil(N / world_size) + block - 1 samples; every rank is padded to that (and never past N)."""
    _check_plan_args(0, 0, world_size, 1, block)
    total = shardlist.num_samples
    return min(total, math.ceil(total / world_size) + block - 1)


def _length(spans: list[Span]) -> int:
    return sum(s.stop - s.start for s in spans)


def _snap(spans: list[Span], offset: int, block: int) -> int:
    """The first block start at or after `offset` in the sequence of spans (each span starts a block)."""
    seen = 0
    for s in spans:
        if offset <= seen:
            return seen
        if offset < seen + s.stop - s.start:
            aligned = -(-(s.start + offset - seen) // block) * block
            if aligned < s.stop:
                return seen + aligned - s.start
        seen += s.stop - s.start
    return seen


def _slice(spans: list[Span], lo: int, hi: int) -> list[Span]:
    out, seen = [], 0
    for s in spans:
        a, b = max(lo - seen, 0), min(hi - seen, s.stop - s.start)
        if a < b:
            out.append(s._replace(start=s.start + a, stop=s.start + b))
        seen += s.stop - s.start
    return out


def _split(spans: list[Span], parts: int, block: int) -> list[list[Span]]:
    """Cut a sequence of spans into `parts` contiguous runs at block starts, as evenly as blocks allow."""
    total = _length(spans)
    cuts = [_snap(spans, math.ceil(k * total / parts), block) for k in range(parts)] + [total]
    return [_slice(spans, cuts[k], cuts[k + 1]) for k in range(parts)]


def _repeat_start(spans: list[Span], count: int) -> list[Span]:
    """The first `count` samples of the sequence (cycling through it if it is shorter), flagged padded."""
    out = []
    while count > 0:
        part = _slice(spans, 0, count)
        out += [s._replace(padded=True) for s in part]
        count -= _length(part)
    return out


def plan_epoch(shardlist: ShardList, epoch: int, seed: int, world_size: int, num_workers: int = 1,
               block: int = 1) -> list[list[list[Span]]]:
    """plan[rank][worker] = the spans that worker reads this epoch, in order (see the module docstring).

    Depends only on the shard list and (epoch, seed, world_size, num_workers, block)."""
    _check_plan_args(epoch, seed, world_size, num_workers, block)
    order = np.random.default_rng([seed, epoch]).permutation(len(shardlist.shards))
    sequence = [Span(int(i), 0, shardlist.shards[i].samples) for i in order]
    per_rank = rank_sample_count(shardlist, world_size, block)
    plan = []
    for spans in _split(sequence, world_size, block):
        spans = spans + _repeat_start(sequence, per_rank - _length(spans))
        plan.append(_split(spans, num_workers, block))
    return plan


def iter_epoch(shardlist: ShardList, epoch: int, seed: int, rank: int, world_size: int, worker: int = 0,
               num_workers: int = 1, block: int = 1, *, decode: bool = True, on_error: str = "raise",
               skipped: list | None = None) -> Iterator[Sample]:
    """The samples one worker of one rank reads this epoch, padded repeats flagged `padded=True`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker={worker} must lie in [0, num_workers={num_workers})")
    for span in plan_epoch(shardlist, epoch, seed, world_size, num_workers, block)[rank][worker]:
        for sample in read_shard(shardlist, span.shard, start=span.start, stop=span.stop, decode=decode,
                                 on_error=on_error, skipped=skipped):
            yield dataclasses.replace(sample, padded=True) if span.padded else sample


def dataloader_worker() -> tuple[int, int]:
    """(worker, num_workers) of the current torch DataLoader worker; (0, 1) outside one."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)
