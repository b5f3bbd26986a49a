"""Section 5, view replay: milliseconds per view on one core of decoding (`read_shard`), of the student's
render (`views.ShardViews`: each unmixed view once per mix window, then the mix), of `views.render` per view
(which renders the mix partner's unmixed view again) and of the unmixed render alone, on the digits and on
ImageNet-like JPEG photos (`benchmarks.photos`), with a profile of the photo render."""

from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path

from benchmarks.markdown import num, table
from benchmarks.photos import write_photo_shards
from benchmarks.settings import Settings
from benchmarks.timing import interleave, summary
from pipeline import views
from pipeline.manifest import Manifest, ViewsCfg
from pipeline.reader import read_shard
from pipeline.shards import load_shardlist


def _replay_set(shardlist_path: str, count: int, size: int, cfg: ViewsCfg, reps: int) -> dict:
    """ms per view of decoding (the shard reader), of the student's render (`views.ShardViews`: each unmixed
    view once, then the mix), of `views.render` per view (which renders the mix partner's unmixed view again),
    and of the unmixed render alone; plus a profile of the student's render."""
    shardlist = load_shardlist(shardlist_path)
    n = shardlist.shards[0].samples
    # whole mix windows of cache epoch 0 (they move with the epoch): every partner lies among the views read
    count = next(stop for _, stop in views.mix_windows(cfg, 0, 0, n) if stop >= min(count, n))
    samples = list(read_shard(shardlist, 0, stop=count))
    params = [views.sample_params(cfg, 0, 0, x.pos, n, views.image_size(x.image), size=size) for x in samples]
    partners = [views.mix_target(p)[0] for p in params]

    def decode():
        start = time.perf_counter()
        for _ in read_shard(shardlist, 0, stop=count):
            pass
        return (time.perf_counter() - start) * 1e3 / count

    def render():
        start = time.perf_counter()
        shard_views = views.ShardViews({x.pos: x.image for x in samples}, params, size, cfg)
        for x in samples:
            shard_views.view(x.pos)
        return (time.perf_counter() - start) * 1e3 / count

    def render_each():
        start = time.perf_counter()
        for x, p, q in zip(samples, params, partners):
            views.render(x.image, p, size, cfg, partner_image=samples[q].image, partner_params=params[q])
        return (time.perf_counter() - start) * 1e3 / count

    def render_unmixed():
        start = time.perf_counter()
        for x, p in zip(samples, params):
            views.render_unmixed(x.image, p, size, cfg)
        return (time.perf_counter() - start) * 1e3 / count

    runs = interleave({"decode_ms": decode, "render_ms": render, "render_each_ms": render_each,
                       "render_unmixed_ms": render_unmixed}, reps)
    profile = cProfile.Profile()
    profile.runcall(render)
    stats = pstats.Stats(profile)
    total = stats.total_tt
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:8]
    hot = [{"function": func if file == "~" else f"{Path(file).name}:{line}({func})", "calls": calls,
            "share": tottime / total}
           for (file, line, func), (_, calls, tottime, _, _) in top]
    mixed = sum(1 for x, q in zip(samples, partners) if q != x.pos)
    return {name: summary(values) for name, values in runs.items()} | {
        "views": count, "size": size, "mixed_share": mixed / count, "profile_top_tottime": hot,
        "source_size": list(views.image_size(samples[0].image))}


def measure(work: Path, m: Manifest, s: Settings) -> dict:
    photos = write_photo_shards(work / "photos", s.photos, shard_size=s.photos)
    return {
        "digits": _replay_set(m.data.train, s.replay_views, m.student.img_size, m.views, s.reps),
        "photos": _replay_set(str(photos), s.photos, s.photo_size, ViewsCfg(), s.reps),
    }


def markdown(vr: dict) -> list[str]:
    rows = []
    for name, label in (("digits", "digits (PNG, 32 px source)"), ("photos", "ImageNet-like photos (JPEG)")):
        r = vr[name]
        dec, ren, un = r["decode_ms"]["median"], r["render_ms"]["median"], r["render_unmixed_ms"]["median"]
        each = r["render_each_ms"]["median"]
        floor = dec + ren
        rows.append([label, f"{r['size']}", num(dec), num(ren), num(each), num(un), num(floor),
                     num(1e3 / floor),
                     f"One core replays {num(1e3 / floor)} views/s; rendering each unmixed view once per window "
                     f"takes {num(max(0.0, 1 - ren / each) * 100, 2)}% off `views.render` per view, and the mix "
                     f"costs {num(max(0.0, ren / un - 1) * 100, 2)}% on top of the unmixed render."])
    prof = vr["photos"]["profile_top_tottime"]
    return (["## 5. View replay", "",
             "Milliseconds per view on one core: decode (`read_shard`, tar + image decode), the student's render "
             "(`views.ShardViews`, as stage 1 and the student's reader use it: each unmixed view once per mix "
             "window, then the mix), `views.render` per view (which renders the mix partner's unmixed view again) "
             "and the unmixed render alone.", ""]
            + table(["set", "size", "decode", "render", "views.render each", "unmixed", "decode + render",
                      "views/s/core", "interpretation"], rows)
            + ["", "Profile of the photo render (share of its time, own time per function):", ""]
            + table(["function", "calls", "share"], [[p["function"], str(p["calls"]), f"{p['share'] * 100:.1f}%"]
                                                      for p in prof]))


def goals(vr: dict) -> list[list[str]]:
    ph = vr["photos"]
    return [["5", f"decode + render per view, ImageNet-like photo to {ph['size']} px (ms, one core)",
             num(ph["decode_ms"]["median"] + ph["render_ms"]["median"]), "see the 224 px section", "n/a"]]
