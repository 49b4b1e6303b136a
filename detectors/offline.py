"""Keep ultralytics off the network and out of the user's home folder.

ultralytics probes DNS, checks for updates, writes a settings file under ~/.config and, when
training or plotting, downloads a font. framegrid runs on closed networks, so before the first
`import ultralytics` we point its config dir at a folder of ours, declare it offline, and give
it a local font. Must run before ultralytics is imported anywhere in the process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from streams.paths import default_state_dir


def prepare_ultralytics_offline(config_dir: Path | None = None, for_training: bool = False) -> Path:
    """Set ultralytics' environment for offline use; returns its config dir.

    Has no effect on settings already read if ultralytics was imported before (a warning would
    be pointless: the caller cannot undo that), so it is called at import of our YOLO backend.
    """
    config_dir = Path(config_dir) if config_dir else default_state_dir() / "ultralytics"
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_VERBOSE", "False")
    user_dir = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    user_dir.mkdir(parents=True, exist_ok=True)
    if for_training:
        # Training plots labels with Arial; without a local copy ultralytics downloads it.
        font = _local_font()
        if font is not None:
            for name in ("Arial.ttf", "Arial.Unicode.ttf"):
                target = user_dir / name
                if not target.exists():
                    shutil.copyfile(font, target)
    return user_dir


def _local_font() -> Path | None:
    candidates = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    try:
        import matplotlib

        candidates.insert(0, Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")
    except ImportError:
        pass
    return next((p for p in candidates if p.exists()), None)
