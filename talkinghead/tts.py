"""Text to speech, offline: Debian's `espeak-ng`, or a piper voice, streamed as it synthesises.

`Speech.stream(text)` yields the speech as float32 16 kHz mono blocks (framegrid's session rate)
while it is still being synthesised, so a live session can start speaking before the whole text is.

- espeak-ng (the default, always there): `espeak-ng --stdout` with the text on its stdin writes a
  WAV stream (22.05 kHz mono s16le, its header's sizes left open), read and resampled 100 ms at a time.
- piper (`[tts] piper`, voices by name: a voice's `.onnx` with its `.onnx.json` beside it, from the
  piper-voices collection): the `piper` package phonemises with its own espeak-ng data and runs the
  voice on ONNX Runtime with one thread (so it does not compete with the process's own runtime for
  the cores), one sentence at a time; each sentence is resampled as it comes.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .audio import Resampler

BLOCK_BYTES = 2 * 2205  # 100 ms of espeak-ng's 22.05 kHz mono s16le: the first block comes this soon
MAX_TEXT = 5000  # characters per utterance
VOICE_PATTERN = r"^[A-Za-z0-9_+\-/]+$"  # an espeak-ng voice or a piper voice's name
DEFAULT_SPEED = 170  # words per minute: espeak-ng's own default; a piper voice's length scale 1


class TtsError(Exception):
    """Text that cannot be spoken, or no engine to speak it (the message says which and what to do)."""


def piper_voice_error(name: str, path: Path) -> str | None:
    """What is missing for piper voice `name` at `path` (None when both files are there)."""
    config = Path(f"{path}.json")
    missing = [p for p in (path, config) if not p.is_file()]
    if not missing:
        return None
    return (f"piper voice {name}: {' and '.join(str(p) for p in missing)} not found; download the voice's "
            f"{path.name} and {config.name} from the piper-voices collection (e.g. en_US-lessac-medium) "
            "and put them there")


class Speech:
    """One engine's settings (`[tts]`): `voice` (an espeak-ng voice name, e.g. `en`, `en-us`, `de`, or
    the name of a piper voice), `speed` (words per minute), `piper` (piper voices by name)."""

    def __init__(self, voice: str, speed: int, piper: Mapping[str, Path] | None = None,
                 binary: str = "espeak-ng") -> None:
        self.voice, self.speed, self.binary = voice, speed, binary
        self.piper = dict(piper or {})
        self._loaded: dict[str, Any] = {}  # piper.PiperVoice by name, loaded on first use
        self._lock = threading.Lock()

    def stream(self, text: str, voice: str | None = None) -> Iterator[np.ndarray]:
        """The speech of `text` in 16 kHz float32 mono blocks, as it is synthesised."""
        text = text.strip()
        if not text:
            raise TtsError("text is empty")
        if len(text) > MAX_TEXT:
            raise TtsError(f"text of {len(text)} characters: at most {MAX_TEXT} per utterance")
        voice = voice or self.voice
        if voice in self.piper:
            return self._piper(text, voice)
        return self._espeak(text, voice)

    def _piper(self, text: str, name: str) -> Iterator[np.ndarray]:
        from piper import SynthesisConfig

        model = self._piper_voice(name)
        resampler = Resampler(model.config.sample_rate)
        config = SynthesisConfig(length_scale=DEFAULT_SPEED / self.speed)
        try:
            for chunk in model.synthesize(text, config):
                block = resampler.push(chunk.audio_float_array)
                if len(block):
                    yield block
        except Exception as exc:  # the voice's model failed on this text: this utterance only
            raise TtsError(f"piper voice {name}: {exc}") from exc
        tail = resampler.flush()
        if len(tail):
            yield tail

    def _piper_voice(self, name: str) -> Any:
        with self._lock:
            if name not in self._loaded:
                path = self.piper[name]
                missing = piper_voice_error(name, path)
                if missing:
                    raise TtsError(missing)
                try:
                    import onnxruntime
                    from piper import PiperConfig, PiperVoice
                except ImportError as exc:
                    raise TtsError(f"piper voice {name}: the piper-tts package is missing ({exc}): "
                                   "run the README's set-up command") from exc
                import json

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = options.inter_op_num_threads = 1
                try:
                    config = PiperConfig.from_dict(json.loads(Path(f"{path}.json").read_text("utf-8")))
                    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                except Exception as exc:
                    raise TtsError(f"piper voice {name}: {path} is not a piper voice: {exc}") from exc
                self._loaded[name] = PiperVoice(session=session, config=config)
            return self._loaded[name]

    def _espeak(self, text: str, voice: str) -> Iterator[np.ndarray]:
        exe = shutil.which(self.binary)
        if exe is None:
            raise TtsError(f"{self.binary} not found: install it (Debian/Ubuntu: apt install espeak-ng)")
        return self._espeak_run(exe, text, voice)

    def _espeak_run(self, exe: str, text: str, voice: str) -> Iterator[np.ndarray]:
        proc = subprocess.Popen([exe, "--stdout", "-v", voice, "-s", str(self.speed)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.write(text.encode("utf-8"))
            proc.stdin.close()
            header = _read(proc.stdout, 44)
            if len(header) < 44 or header[:4] != b"RIFF":
                proc.wait(5)
                err = (proc.stderr.read() if proc.stderr else b"").decode("utf-8", "replace").strip()
                raise TtsError(f"{self.binary} gave no speech for voice {voice!r}: {err or 'no output'}")
            resampler = Resampler(int.from_bytes(header[24:28], "little"))
            while data := _read(proc.stdout, BLOCK_BYTES):
                block = resampler.push(np.frombuffer(data[: len(data) // 2 * 2], "<i2"))
                if len(block):
                    yield block
            tail = resampler.flush()
            if len(tail):
                yield tail
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
            if proc.stderr is not None:
                proc.stderr.close()


def _read(pipe: Any, n: int) -> bytes:
    """Up to `n` bytes (fewer only at the end of the stream)."""
    parts, got = [], 0
    while got < n:
        chunk = pipe.read1(n - got) if hasattr(pipe, "read1") else pipe.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
