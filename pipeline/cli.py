"""The `framegrid` command: run, validate, probe.

Exit codes: 0 success, 2 bad configuration or input (with every error printed and its key path),
1 a runtime failure. All output passes through credential redaction.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from streams import MissingExtra, SourceSettings, StreamError, probe, redact_text, require
from streams.handoff import wait_event
from streams.loopwatch import LoopWatch
from streams.sinks import PRESETS

from .config import ApiConfig, Config, ConfigError, LipSyncConfig, default, load_config
from .logs import setup_logging

log = logging.getLogger("framegrid")
CONFIG_DEFAULT = Path("config.toml")


def _status_table(stats: dict[str, Any]) -> str:
    rows = [f"{'stream':<16} {'state':<13} {'in fps':>7} {'out fps':>7} {'stale':>6} {'old':>5} {'err':>4}"
            f" {'p50 ms':>7} {'p95 ms':>7}"]
    for name, s in stats["streams"].items():
        lat = s["latency_ms"]
        rows.append(
            f"{name[:16]:<16} {s['state'][:13]:<13} {s['fps_in']:>7.1f} {s['fps_processed']:>7.1f} "
            f"{s['drops']['stale']:>6} {s['drops']['too_old']:>5} {s['drops']['error']:>4} "
            f"{_ms(lat['p50']):>7} {_ms(lat['p95']):>7}"
        )
    m = stats["mqtt"]
    rows.append(f"mqtt: {'connected' if m.get('connected') else 'DISCONNECTED'}, published {m.get('published', 0)}, "
                f"buffered {m.get('buffered', 0)}, dropped {m.get('dropped_overflow', 0)}")
    load = stats.get("load") or {}
    if load.get("status") == "overloaded":
        rows.append(f"OVERLOADED ({', '.join(load['reasons'])}): {load['detail']}")
    return "\n".join(rows)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


async def _run(config: Config, config_path: Path | None = None) -> int:
    """The one run path, for one process and for a cluster head: what runs the streams (a `Pipeline`
    or a `ClusterHead`), its HTTP API, the status printer and the talk-job queue, in one TaskGroup."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner, api = _runner(config, config_path)
    except MissingExtra as exc:
        log.error("%s", exc)
        return 2
    if api is not None:
        from .api import ApiError

        try:
            api.bind()  # before anything loads: a taken port stops framegrid at once
        except ApiError as exc:
            log.error("%s", exc)
            return 2
    try:
        async with asyncio.TaskGroup() as tg:
            if api is not None:
                tg.create_task(api.serve(), name="api.server")
            side = [tg.create_task(_status(runner, config, stop), name="status"),
                    tg.create_task(_jobs(api, runner.ready), name="api.jobs"),
                    tg.create_task(LoopWatch().run(), name="loopwatch")]
            try:
                await runner.run(stop)
            finally:
                for task in side:  # (a runner that never became ready leaves them waiting)
                    task.cancel()
                if api is not None:
                    await api.stop()
    except ExceptionGroup as group:  # one error stopped it: report that one, not the group
        raise group.exceptions[0] from None
    return 0


def _runner(config: Config, config_path: Path | None) -> tuple[Any, Any]:
    """(what runs the streams, its HTTP API server or None) for this config's deployment shape."""
    if config.cluster.backend == "ray":
        require("ray", "cluster", "cluster.backend = \"ray\"")
        from pipeline.cluster.head import ClusterHead

        head = ClusterHead(config, config_path)
        if not config.api.enabled:
            return head, None
        from pipeline.cluster.api import cluster_api

        return head, cluster_api(head, config_path)
    from .app import Pipeline

    pipeline = Pipeline(config, config_path=config_path)
    if not config.api.enabled:
        return pipeline, None
    from .api import local_api

    return pipeline, local_api(pipeline, config_path)


async def _status(runner: Any, config: Config, stop: asyncio.Event) -> None:
    """Print the status table every `pipeline.status_interval` seconds (one process only)."""
    interval = config.pipeline.status_interval
    if interval <= 0 or not hasattr(runner, "stats_payload"):
        return
    await runner.ready.wait()  # (cancelled by _run when the runner ends first)
    while not stop.is_set():
        if not await wait_event(stop, interval):
            print(redact_text(_status_table(runner.stats_payload()), runner.secrets), file=sys.stderr, flush=True)


async def _jobs(api: Any, ready: asyncio.Event) -> None:
    """The talk-job queue, once the pipeline (or the cluster head) is ready."""
    await ready.wait()
    if api is not None:
        await api.run_jobs()


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(redact_text(str(exc)), file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.log.level, config.secrets())
    # `kill -USR1 <pid>` prints every thread's stack (file, line, function: no values) to stderr
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    log.info("framegrid %s: %d stream(s), %d model(s), mqtt %s", _version(), len(config.streams),
             len(config.models), redact_text(config.mqtt.url))
    _say_overlay(args.config)
    t0 = time.monotonic()
    try:
        rc = asyncio.run(_run(config, args.config))
    except Exception as exc:  # report, redacted, and fail
        log.error("framegrid stopped on an error: %s", redact_text(repr(exc), config.secrets()))
        return 1
    log.info("framegrid: stopped cleanly after %.1fs", time.monotonic() - t0)
    return rc


def _say_overlay(config_path: Path) -> None:
    """At start-up: one line when runtime API changes kept beside the TOML change its streams."""
    from .overlay import describe_overlay, overlay_path, read_overlay, read_talk_overlay

    extra = overlay_path(config_path)
    change = describe_overlay(read_overlay(extra))  # (load_config already refused an unreadable one)
    talk = read_talk_overlay(extra)
    started = sorted(n for n, e in talk.items() if e is not None)
    stopped = sorted(n for n, e in talk.items() if e is None)
    if started or stopped:
        log.warning("%s keeps talk sessions changed through the API: %s", extra.name, "; ".join(
            f"{what} {', '.join(names)}" for what, names in (("started", started), ("stopped", stopped)) if names))
    if change:
        log.warning("%s overrides %s's streams (changes made through the API): %s; delete it to go back "
                    "to the TOML", extra.name, config_path.name, change)


def cmd_config(args: argparse.Namespace) -> int:
    """`config show`: the effective config (TOML + overlay, defaults filled in, secrets masked);
    `config schema`: its JSON Schema."""
    if args.config_command == "schema":
        print(json.dumps(Config.model_json_schema(), indent=2))
        return 0
    try:
        config = load_config(args.config, check_files=False)
    except ConfigError as exc:
        print(redact_text(str(exc)), file=sys.stderr)
        return 2
    text = json.dumps(config.model_dump(mode="json"), indent=2)  # SecretStr dumps masked
    print(redact_text(text, config.secrets()))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(redact_text(str(exc)), file=sys.stderr)
        return 2
    from .overlay import overlay_path

    extra = overlay_path(args.config)
    with_overlay = f" with the runtime changes in {extra.name}" if extra.exists() else ""
    print(f"{args.config}: ok{with_overlay} ({len(config.streams)} stream(s), {len(config.models)} model(s))")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    opts = SourceSettings(open_timeout=args.timeout, stall_timeout=args.timeout, transport=args.transport)
    try:
        result = probe(args.url, opts)
    except StreamError as exc:
        print(f"probe failed: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"url": redact_text(result.url), "codec": result.codec, "width": result.width,
                          "height": result.height, "fps": result.fps, "pix_fmt": result.pix_fmt,
                          "open_ms": round(result.open_ms, 1), "first_frame_ms": round(result.first_frame_ms, 1)}))
        return 0
    print(redact_text(result.describe()))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from pipeline.core.devices import GB, decode_threads, discover, plan_slots
    from pipeline.core.planning import plan_models

    config = Config()
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(redact_text(str(exc)), file=sys.stderr)
            return 2
    cfg = config.devices
    devices = discover()
    out: dict[str, Any] = {"devices": [
        {"id": d.id, "name": d.name, "total_gb": round(d.total_bytes / GB, 2), "free_gb": round(d.free_bytes / GB, 2),
         "utilization": d.utilization, "cores": d.cores} for d in devices]}
    plans = plan_slots(devices, int(cfg.slot_memory_gb * GB), cfg.usable_fraction, dict(cfg.overrides),
                       cfg.cpu_slots, cfg.cpu_threads_per_slot, use_cpu_with_gpus=cfg.use_cpu_with_gpus)
    out["detect_slots"] = [{"device": p.device.id, "slots": p.slots, "reason": p.reason} for p in plans]
    if args.config is not None and config.models:
        try:
            plan = plan_models(config.models, sorted(config.models), cfg, devices)
        except ConfigError as exc:
            print(redact_text(str(exc)), file=sys.stderr)
            return 2
        out["models"] = {name: plan.describe(name) for name in plan.layouts}
        cores = next((d.cores for d in devices if d.kind == "cpu"), 1) or 1
        n = sum(1 for s in config.streams.values() if s.enabled)
        out["decode"] = {"streams": n, "threads_each": decode_threads(cores, n, config.pipeline.decode_threads)}
    lcfg = config.lipsync
    if any(t.enabled and t.backend == "musetalk" for t in config.talk.values()):
        from pipeline.talk.lipsync import plan_lipsync

        out["lipsync_slots"] = [{"device": p.device.id, "slots": p.slots, "reason": p.reason}
                                for p in plan_lipsync(devices, lcfg.slot_memory_gb, cfg.usable_fraction, lcfg.slots)]
        out["lipsync_configured"] = lcfg.slots
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print("devices:")
    for d in out["devices"]:
        extra = f", {d['utilization']:.0f}% busy" if d["utilization"] is not None else ""
        extra += f", {d['cores']} cores" if d["cores"] else ""
        print(f"  {d['id']:<8} {d['name']}: {d['total_gb']:.1f} GB total, {d['free_gb']:.1f} GB free{extra}")
    print("plan (detect slots):")
    for row in out["detect_slots"]:
        print(f"  {row['reason']}")
    print(f"total: {sum(r['slots'] for r in out['detect_slots'])} slot(s)")
    if "models" in out:
        print("models:")
        for name, text in out["models"].items():
            print(f"  {name}: {text}")
        print(f"decode: {out['decode']['streams']} stream(s), {out['decode']['threads_each']} FFmpeg thread(s) each")
    if "lipsync_slots" in out:
        print("plan (lipsync slots, MuseTalk):")
        for row in out["lipsync_slots"]:
            print(f"  {row['reason']}")
        if lcfg.slots is not None:
            print(f"  lipsync.slots = {lcfg.slots} (configured)")
    return 0


def _box(text: str | None) -> tuple[int, int, int, int] | None:
    if not text:
        return None
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("--box needs x1,y1,x2,y2")
    return parts[0], parts[1], parts[2], parts[3]


def _progress_bar(label: str) -> Any:
    """A progress callback (done, total): a tqdm bar on a terminal; elsewhere (Docker, CI, a file)
    plain lines at every tenth, never carriage returns."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar: Any = None

        def on_tty(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, desc=label, unit="frame", file=sys.stderr)
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

        return on_tty
    shown = -1

    def plain(done: int, total: int) -> None:
        nonlocal shown
        tenth = 10 * done // max(total, 1)
        if tenth > shown or done >= total:
            shown = tenth
            print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)

    return plain


def cmd_avatar_prepare(args: argparse.Namespace) -> int:
    """Find the face in every frame of a photo or video and cache it; with --weights, MuseTalk's latents too."""
    from talkinghead import AvatarError, prepare_avatar

    try:
        from talkinghead.musetalk import version_defaults

        margin = (args.extra_margin if args.extra_margin is not None
                  else int(version_defaults(args.version)["extra_margin"]))
        avatar = prepare_avatar(args.image, name=args.name, box=_box(args.box), extra_margin=margin,
                                max_frames=args.max_frames, progress=_progress_bar("faces"))
    except AvatarError as exc:
        print(f"avatar: {exc}", file=sys.stderr)
        return 2
    n = len(avatar.frames)
    print(f"avatar {avatar.name}: {avatar.size[0]}x{avatar.size[1]}, {n} frame{'s' if n != 1 else ''}, "
          f"face box {avatar.box}, mouth {avatar.mouth}")
    if args.weights is not None:
        from talkinghead.musetalk import MuseTalk, MuseTalkError

        model = MuseTalk(args.weights, args.version, parts={"vae", "whisper"})
        try:
            model.load()
            faces = model.prepare_faces(avatar, progress=_progress_bar("latents"))
        except MuseTalkError as exc:
            print(f"avatar: {exc}", file=sys.stderr)
            return 2
        parsing = "face parsing" if model.parser is not None else "geometric mask"
        print(f"avatar {avatar.name}: MuseTalk {args.version} latents and masks cached ({len(faces)} frames in "
              f"ping-pong order, {parsing})")
    return 0


def cmd_talk(args: argparse.Namespace) -> int:
    """Render (or stream, with --realtime) a talking head from an avatar image and an audio input."""
    from streams.sinks import LIVE, AVSink, Encoding, SinkError, container_for
    from talkinghead import SAMPLE_RATE, AvatarError, EnergyLipSync, TalkSession, prepare_avatar
    from talkinghead.audio import iter_audio
    from talkinghead.avatar import LIVE_MAX_FRAMES

    try:
        margin = 10  # the face box's chin margin: MuseTalk v1.5's (v1.0 has none)
        if args.backend == "musetalk":
            from talkinghead.musetalk import version_defaults

            margin = int(version_defaults(args.version)["extra_margin"])
        live = args.realtime or container_for(args.out)[1] is not None  # a stream or a playlist: latency first
        avatar = prepare_avatar(args.avatar, box=_box(args.box), extra_margin=margin,
                                max_frames=LIVE_MAX_FRAMES if live else None)  # a file: every frame
        w, h = avatar.size
        given = None if live or not Path(args.audio).is_file() else args.audio  # a file: its own audio, as given
        sink = AVSink(args.out, w, h, encoding=LIVE if live else Encoding(args.preset, args.crf, live=False),
                      audio_source=given)
    except (AvatarError, SinkError) as exc:
        print(f"talk: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    tty = sys.stderr.isatty()

    def progress(i: int, level: float) -> None:
        # on a terminal one line rewritten each second; elsewhere (Docker, CI, a file) a plain line every 10 s
        if tty and i % 25 == 0:
            print(f"\rtalk: {i / 25:7.1f} s rendered", end="", file=sys.stderr, flush=True)
        elif not tty and i % 250 == 0 and i:
            print(f"talk: {i / 25:.0f} s rendered", file=sys.stderr, flush=True)

    if args.backend == "musetalk":
        return _talk_musetalk(args, avatar, sink)
    session = TalkSession("cli", EnergyLipSync(avatar), iter_audio(args.audio, SAMPLE_RATE), sink,
                          realtime=args.realtime, on_frame=progress)
    t0 = time.monotonic()
    session.start()
    try:
        session.wait()
    except KeyboardInterrupt:
        session.stop()
    if tty:
        print(file=sys.stderr)
    took = time.monotonic() - t0
    snap = session.snapshot()
    if session.state == "failed":
        print(f"talk: failed: {redact_text(session.error or '')}", file=sys.stderr)
        return 2
    print(f"talk: {snap['frames']} frames ({snap['frames'] / 25:.1f} s) in {took:.1f} s -> "
          f"{redact_text(args.out)} (backend energy: loudness-driven mouth, no learned lip shapes)")
    return 0


def _talk_musetalk(args: argparse.Namespace, avatar: Any, sink: Any) -> int:
    """Offline MuseTalk: audio prompts and avatar latents here; UNet + VAE segments dealt to the lipsync slots."""
    from pipeline.talk.lipsync import LipSyncError, musetalk_pool
    from talkinghead import AudioError, load_audio
    from talkinghead.musetalk import MuseTalk, MuseTalkError
    from talkinghead.offline import render

    if args.weights is None:
        print("talk: --backend musetalk needs --weights DIR (the MuseTalk models folder)", file=sys.stderr)
        sink.close()
        return 2
    frontend = MuseTalk(args.weights, args.version, parts={"vae", "whisper"})
    pool = None
    t0 = time.monotonic()
    try:
        frontend.load()
        samples = load_audio(args.audio)
        given = {k: v for k, v in (("slots", args.slots), ("batch_size", args.batch_size),
                                   ("slot_memory_gb", args.slot_memory_gb)) if v is not None}
        pool = musetalk_pool(LipSyncConfig(weights=args.weights, version=args.version, **given)).start_in_thread()

        def submit(jobs: list[Any], k: int) -> Any:
            return pool.submit("offline", jobs, slot=k)

        counts = render(
            frontend,
            avatar,
            samples,
            sink,
            batch_size=pool.settings.batch_size,
            progress=_progress_bar("talk"),
            submit=submit,
            in_flight=2 * pool.n,
            always=args.render_silence == "always",
        )
    except (MuseTalkError, AudioError, LipSyncError) as exc:
        print(f"\ntalk: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    finally:
        sink.close()
        if pool is not None:
            pool.shutdown()
    print(
        f"talk: {counts['frames']} frames ({counts['generated']} generated, {counts['idle']} silent) in "
        f"{time.monotonic() - t0:.1f} s on {pool.n} lipsync slot{'s' if pool.n != 1 else ''} -> "
        f"{redact_text(args.out)} (MuseTalk {args.version})"
    )
    return 0


def _since(text: str) -> float:
    """A unix time, an ISO date-time, or a duration back from now (90s, 15m, 2h, 7d)."""
    import datetime as dt
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text)
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {text!r}: give 15m, 2h, 7d, an ISO date-time or a unix time"
        ) from None
    return (when if when.tzinfo else when.astimezone()).timestamp()


def cmd_events(args: argparse.Namespace) -> int:
    """List stored events, newest first."""
    import datetime as dt

    from pipeline.analytics.eventstore import query
    from pipeline.analytics.service import events_db

    try:
        config = load_config(args.config, check_files=False)
    except ConfigError as exc:
        print(redact_text(str(exc)), file=sys.stderr)
        return 2
    db = events_db(config, Path(args.config))
    rows = query(db, stream=args.stream, label=args.label, since=args.since, limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no events in {db}" + ("" if db.exists() else " (not created yet)"))
        return 0
    print(f"{'start':<19} {'end':<8} {'stream':<14} {'label':<12} {'score':>5}  zones / snapshot / clip")
    for r in rows:
        start = dt.datetime.fromtimestamp(r["start_time"]).strftime("%Y-%m-%d %H:%M:%S")
        end = dt.datetime.fromtimestamp(r["end_time"]).strftime("%H:%M:%S") if r["end_time"] else "live"
        print(
            f"{start:<19} {end:<8} {r['stream']:<14} {r['label']:<12} {r['best_score']:>5.2f}  "
            f"{','.join(r['zones']) or '-'} {r['crop_path'] or ''}"
            + (f" {r['clip_path']} ({r['clip_size'] / 1e6:.1f} MB, {r['clip_end'] - r['clip_start']:.1f} s)"
               if r["clip_path"] else "")
        )
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("framegrid")
    except PackageNotFoundError:  # a checkout run without installing
        return "unknown"


def _config_arg(p: argparse.ArgumentParser, default: Path | None = CONFIG_DEFAULT) -> None:
    """The same positional CONFIG on every command that reads one."""
    p.add_argument("config", nargs="?", default=default, type=Path, metavar="CONFIG",
                   help="the TOML config file" + (f" (default: {default})" if default else " (optional)"))


def _add_talk_parser(sub: Any) -> None:
    p = sub.add_parser("talk", help="lip-sync an avatar image to an audio file or URL, to a file or a live sink")
    p.add_argument("--avatar", required=True, type=Path, help="a photo with a frontal face")
    p.add_argument("--audio", required=True, help="audio file or FFmpeg URL")
    p.add_argument("--out", required=True, help="file (.mp4/.mkv), HLS playlist (.m3u8), rtsp:// or rtmp:// URL")
    p.add_argument("--box", help="face box x1,y1,x2,y2 instead of detection")
    p.add_argument("--realtime", action="store_true", help="pace output at 25 fps (live sinks; energy backend)")
    p.add_argument("--backend", choices=["energy", "musetalk"], default="energy")
    p.add_argument("--weights", type=Path, help="MuseTalk models folder (official layout)")
    p.add_argument("--musetalk-version", dest="version", choices=["v15", "v1"], default="v15",
                   help="MuseTalk release of the weights (default: v15)")
    p.add_argument("--batch-size", type=int, help="frames per UNet batch (musetalk; default: lipsync.batch_size's)")
    p.add_argument("--slots", type=int, help="lipsync slots (musetalk; default: the device plan, 1 on a CPU)")
    p.add_argument(
        "--slot-memory-gb", type=float, help="GPU memory one MuseTalk slot needs (default: lipsync.slot_memory_gb's)"
    )
    p.add_argument(
        "--render-silence",
        choices=["around_speech", "always"],
        default=default(LipSyncConfig, "offline_render_silence"),
        help="musetalk: the model on every frame (default, as MuseTalk's published inference) or around speech only",
    )
    p.add_argument("--crf", type=int, default=default(ApiConfig, "jobs_crf"), choices=range(52), metavar="0-51",
                   help="x264 CRF of a file output (default: 18, MuseTalk's published inference)")
    p.add_argument("--preset", choices=PRESETS, default=default(ApiConfig, "jobs_preset"),
                   help="x264 preset of a file output (default: medium); live outputs are always ultrafast")
    p.set_defaults(func=cmd_talk)


def parser() -> argparse.ArgumentParser:
    """The `framegrid` command line: one sub-command per job."""
    ap = argparse.ArgumentParser(prog="framegrid", description="Real-time video analytics and talking-head server")
    ap.add_argument("--version", action="version", version=f"framegrid {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the pipeline until SIGINT/SIGTERM")
    _config_arg(p)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="check a config file; exit 2 with every error")
    _config_arg(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("probe", help="print codec, resolution and frame rate of a stream")
    p.add_argument("url")
    p.add_argument(
        "--timeout",
        type=float,
        default=SourceSettings.model_fields["open_timeout"].default,
        help="seconds to open and to wait for a frame",
    )
    p.add_argument("--transport", choices=["tcp", "udp"], default="tcp")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("config", help="the effective config (show) or its JSON Schema (schema)")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    p = config_sub.add_parser("show", help="the config as framegrid runs it: TOML + overlay, defaults filled "
                              "in, secrets masked (JSON)")
    _config_arg(p)
    p.set_defaults(func=cmd_config)
    p = config_sub.add_parser("schema", help="the config file's JSON Schema")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("devices", help="list devices and the executor-slot plan, before loading anything")
    _config_arg(p, default=None)
    p.add_argument("--json", action="store_true", help="print devices and plans as JSON")
    p.set_defaults(func=cmd_devices)
    _add_talk_parser(sub)
    p = sub.add_parser("events", help="list stored events (tracked objects), newest first")
    _config_arg(p)
    p.add_argument("--stream")
    p.add_argument("--label")
    p.add_argument("--since", type=_since, help="15m, 2h, 7d, an ISO date-time or a unix time")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_events)
    p = sub.add_parser("avatar", help="avatar tools")
    avatar_sub = p.add_subparsers(dest="avatar_command", required=True)
    p = avatar_sub.add_parser("prepare", help="find the face (per frame of a video) and cache the avatar")
    p.add_argument("image", type=Path, help="a photo, or a short video (.mp4, .mov, .mkv, ...)")
    p.add_argument("--name")
    p.add_argument("--box", help="face box x1,y1,x2,y2 instead of detection")
    p.add_argument(
        "--extra-margin",
        type=int,
        help="chin margin added to the face box (default: the MuseTalk version's: 10 for v15, 0 for v1)",
    )
    p.add_argument("--max-frames", type=int, default=250, help="frames kept of a video avatar")
    p.add_argument("--weights", type=Path, help="MuseTalk folder: also cache the VAE latents and blend masks")
    p.add_argument("--musetalk-version", dest="version", choices=["v15", "v1"],
                   default=LipSyncConfig.model_fields["version"].default, help="MuseTalk release of the weights")
    p.set_defaults(func=cmd_avatar_prepare)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MissingExtra as exc:  # one line naming the pip install, never a traceback
        print(f"framegrid {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
