"""MuseTalk (v1.5, and v1.0 where it differs) inference, written with diffusers and transformers.

What the authors publish, step by step:

* avatar crop: MuseTalk's face box (see `avatar.musetalk_box`), resized to 256x256 (Lanczos);
  the VAE encodes the crop with its lower half masked (set to -1 after normalising) and the full
  crop; the two latents are concatenated masked-first into 8 channels;
* audio: 16 kHz mono -> Whisper log-mel features in 30 s segments -> the Whisper *encoder* with
  every hidden state kept (embeddings + each layer) -> 50 feature frames per second; video frame
  i at 25 fps takes the 10 feature frames starting at 2i of the sequence left-padded by 4 (the v1.5
  window around the frame) across all layers, flattened to (10 x layers, d_model), plus a
  sinusoidal position encoding;
* UNet (`UNet2DConditionModel` from the official `musetalk.json`) called once at timestep 0 with
  the audio as `encoder_hidden_states`; VAE decode; the 256 face is resized back into the box and
  blended through a mask that keeps only the lower part of the face (upper boundary at half the
  blend crop, Gaussian blur of 10% of its size).

Sizes are read from the loaded configs (Whisper's d_model and layer count, the mel hop, the VAE's
downsampling and scaling factor), never hard-coded, so small test models run the same code.
Weights come from a local folder in the official layout (`MUSETALK_LAYOUT`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from streams import require

from .defaults import CHEEK_WIDTH, VERSION
from .faceparse import CHECKPOINT

log = logging.getLogger(__name__)

CROP = 256  # MuseTalk works on 256x256 face crops
VIDEO_FPS = 25
WINDOW_LEFT = 2  # video frames of context each side (v1.5: audio_padding_length_left/right)
WINDOW_RIGHT = 2

MUSETALK_LAYOUT = {
    "v15": {"unet": "musetalkV15/unet.pth", "config": "musetalkV15/musetalk.json"},
    "v1": {"unet": "musetalk/pytorch_model.bin", "config": "musetalk/musetalk.json"},
}
DOWNLOADS = (
    "Download from Hugging Face on a machine with internet access and copy into {root}: "
    "TMElyralab/MuseTalk (musetalkV15/unet.pth and musetalk.json, or musetalk/ for v1.0), "
    "stabilityai/sd-vae-ft-mse -> sd-vae/, openai/whisper-tiny -> whisper/ "
    "(optional: face-parse-bisent/79999_iter.pth, the face-parsing BiSeNet for the blend mask; without it a "
    "geometric lower-face mask is used)."
)


_WARNED_NO_PARSER: set[Path] = set()  # weights folders whose missing face parser was reported


class MuseTalkError(Exception):
    """Weights missing or unusable; the message lists what to download and where it goes."""


def check_layout(root: Path, version: str = VERSION) -> dict[str, Path]:
    """The files MuseTalk needs under `root`; raises listing every missing piece at once."""
    if version not in MUSETALK_LAYOUT:
        raise MuseTalkError(f"unknown MuseTalk version {version!r} (v15 or v1)")
    want = {
        "unet": root / MUSETALK_LAYOUT[version]["unet"],
        "unet_config": root / MUSETALK_LAYOUT[version]["config"],
        "vae": root / "sd-vae",
        "whisper": root / "whisper",
    }
    missing = [str(p.relative_to(root)) for p in want.values() if not p.exists()]
    for folder in ("sd-vae", "whisper"):
        if (root / folder).is_dir() and not (root / folder / "config.json").is_file():
            missing.append(f"{folder}/config.json")
    if missing:
        raise MuseTalkError(f"MuseTalk weights incomplete in {root}: missing {', '.join(missing)}. "
                            + DOWNLOADS.format(root=root))
    return want


def quiet_loading() -> None:
    """No per-load progress bars from transformers (a "Loading weights" bar per model, per slot,
    per restart in framegrid's log); framegrid logs what it loads itself."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency of the talk extra
        pass


def positional_encoding(seq_len: int, d_model: int) -> np.ndarray:
    """The sinusoidal encoding MuseTalk adds to the audio prompts (sin on even, cos on odd dims)."""
    pe = np.zeros((seq_len, d_model), np.float32)
    position = np.arange(seq_len, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, d_model, 2, dtype=np.float32) * (-math.log(10000.0) / d_model))
    pe[:, 0::2] = np.sin(position * div)
    pe[:, 1::2] = np.cos(position * div)[:, : d_model // 2]
    return pe


def window_indices(frame: int, audio_fps: int, fps: int = VIDEO_FPS) -> range:
    """Indices (into the left-padded feature sequence) of the features video frame `frame` uses."""
    per_frame = audio_fps // fps
    length = per_frame * (WINDOW_LEFT + WINDOW_RIGHT + 1)
    start = math.floor(frame * audio_fps / fps)
    return range(start, start + length)


def lower_half_mask(size: int = CROP) -> np.ndarray:
    """1 on the upper half (kept), 0 on the lower half (the mouth MuseTalk regenerates)."""
    m = np.zeros((size, size), np.float32)
    m[: size // 2] = 1.0
    return m


def blend_region(box: tuple[int, int, int, int], expand: float) -> tuple[int, int, int, int]:
    """MuseTalk's square blend crop around the face box (`get_crop_box`), NOT clipped to the image:
    near an edge it reaches outside, and the mask's geometry is computed on that whole square."""
    x1, y1, x2, y2 = box
    xc, yc = (x1 + x2) // 2, (y1 + y2) // 2
    s = int(max(x2 - x1, y2 - y1) // 2 * expand)
    return xc - s, yc - s, xc + s, yc + s


def padded_crop(frame: np.ndarray, crop: tuple[int, ...]) -> np.ndarray:
    """`frame[crop]` with black where the crop reaches outside the image (as PIL's `crop` does)."""
    cx1, cy1, cx2, cy2 = crop
    h, w = frame.shape[:2]
    out = np.zeros((cy2 - cy1, cx2 - cx1, *frame.shape[2:]), frame.dtype)
    ix1, iy1, ix2, iy2 = max(0, cx1), max(0, cy1), min(w, cx2), min(h, cy2)
    if ix2 > ix1 and iy2 > iy1:
        out[iy1 - cy1:iy2 - cy1, ix1 - cx1:ix2 - cx1] = frame[iy1:iy2, ix1:ix2]
    return out


BLUR_OFFLINE = 0.05  # upstream `get_image` (whole-file inference): 5% of the blend crop
BLUR_REALTIME = 0.10  # upstream `get_image_prepare_material` (realtime inference): 10%


def blend_mask(box: tuple[int, int, int, int], crop: tuple[int, ...], parsed: np.ndarray | None = None,
               upper_boundary_ratio: float = 0.5, blur: float = BLUR_REALTIME) -> np.ndarray:
    """MuseTalk's blend mask over the (unclipped) blend crop: the face inside its box, below the upper
    boundary, blurred.

    `parsed` is the face-parsing mask (0/255) of the blend crop; without it the whole face box is
    used (the geometric mask). The upper boundary is a share of the crop's height and the blur
    kernel `blur` of its width (odd), as MuseTalk's `get_image` (offline, 5%) and
    `get_image_prepare_material` (realtime, 10%).
    """
    cx1, cy1, cx2, cy2 = crop
    w, h = cx2 - cx1, cy2 - cy1
    mask = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    sy, sx = slice(max(0, y1 - cy1), min(h, y2 - cy1)), slice(max(0, x1 - cx1), min(w, x2 - cx1))
    mask[sy, sx] = 255 if parsed is None else parsed[sy, sx]
    mask[: int(h * upper_boundary_ratio)] = 0
    k = int(blur * w // 2 * 2) + 1
    return cv2.GaussianBlur(mask, (k, k), 0)


def geometric_mask(box: tuple[int, int, int, int], crop: tuple[int, ...], upper_boundary_ratio: float = 0.5,
                   blur: float = BLUR_REALTIME) -> np.ndarray:
    """The blend mask without face parsing (the face box stands in for the parsed skin and lips)."""
    return blend_mask(box, crop, None, upper_boundary_ratio, blur)


def version_defaults(version: str) -> dict[str, Any]:
    """What the official scripts use per version: the chin margin added to the face box (v1.5 only),
    the blend crop's expand factor (1.5 for both since v1.5's release) and the parsing mode."""
    return {"extra_margin": 10 if version == "v15" else 0, "expand": 1.5,
            "parsing_mode": "jaw" if version == "v15" else "raw"}


@dataclass
class PreparedFace:
    """One avatar frame, ready for inference: its latents (1, 8, h, w) and its blend material."""

    frame: np.ndarray
    box: tuple[int, int, int, int]
    latents: Any
    crop: tuple[int, ...]
    mask: np.ndarray  # uint8, blend-crop sized


@dataclass(frozen=True)
class AudioWindow:
    """Audio from which the slot computes a frame's prompt: `audio_prompts(samples)[frame]`. The
    frames of one block share one window object (one Whisper pass per block on the slot)."""

    samples: np.ndarray  # 16 kHz mono float32
    frame: int


@dataclass(frozen=True)
class LipSyncJob:
    """One frame's model work: the avatar frame's 8-channel latents and its audio prompt (or, when
    Whisper runs on the slot, the audio window the slot computes it from)."""

    latents: Any  # (1, 8, h, w)
    prompt: Any  # (prompt_len, d_model), or None with `audio`
    audio: AudioWindow | None = None


class MuseTalk:
    """The three models and the published inference. One instance per lipsync executor slot."""

    kind = "lipsync"

    PARTS = frozenset({"unet", "vae", "whisper"})

    def __init__(self, root: str | Path, version: str = VERSION, device: str = "cpu", half: bool | None = None,
                 seed: int = 0, parts: frozenset[str] | set[str] = PARTS, parsing_mode: str | None = None,
                 cheek_width: int = CHEEK_WIDTH) -> None:
        """`parts` chooses which weights to load: a lipsync slot needs the UNet and the VAE (decode);
        the session side needs the VAE (avatar latents) and Whisper (audio prompts). `parsing_mode`
        (raw, jaw, neck; default: the version's) and `cheek_width` shape the blend mask."""
        self.root = Path(root)
        self.version = version
        self.device = device
        self.half = device.startswith("cuda") if half is None else half  # fp16 on CUDA, fp32 on CPU
        self.seed = seed
        self.parts = frozenset(parts)
        if not self.parts <= self.PARTS:
            raise ValueError(f"unknown MuseTalk parts: {sorted(self.parts - self.PARTS)}")
        defaults = version_defaults(version)
        self.extra_margin = int(defaults["extra_margin"])
        self.expand = float(defaults["expand"])
        self.parsing_mode = parsing_mode or str(defaults["parsing_mode"])
        self.cheek_width = cheek_width
        self.unet: Any = None
        self.vae: Any = None
        self.encoder: Any = None
        self.parser: Any = None  # face parsing (BiSeNet) when its checkpoint is present

    # -- loading ----------------------------------------------------------------------------------
    def load(self) -> None:
        paths = check_layout(self.root, self.version)
        for module in ("diffusers", "transformers"):
            require(module, "talk", "MuseTalk")
        try:
            import torch
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import AutoFeatureExtractor, WhisperConfig, WhisperModel

            dtype = torch.float16 if self.half else torch.float32
            config = json.loads(paths["unet_config"].read_text())
            if "unet" in self.parts:
                unet = UNet2DConditionModel(**config)
                state = torch.load(paths["unet"], map_location="cpu", weights_only=True)
                unet.load_state_dict(state)  # type: ignore[attr-defined]  # diffusers' stubs hide Module's
                # torch's own `to`: diffusers' override warns about modules kept in fp32, which these have none of
                self.unet = torch.nn.Module.to(unet, self.device, dtype).eval()  # type: ignore[call-overload]
            quiet_loading()
            if "vae" in self.parts:
                # low_cpu_mem_usage=False: without `accelerate` diffusers would print its install advice
                # (a block of text) on every load
                self.vae = AutoencoderKL.from_pretrained(paths["vae"], torch_dtype=dtype, low_cpu_mem_usage=False
                                                         ).to(self.device).eval()
                if "whisper" in self.parts:  # the avatar-preparing side
                    self.parser = self._face_parser()
            self.vae_config = (self.vae.config if self.vae is not None
                               else AutoencoderKL.load_config(paths["vae"]))
            if "whisper" in self.parts:
                # no `dtype=` keyword (transformers >= 4.56 only; older ones call it torch_dtype): cast after
                whisper = WhisperModel.from_pretrained(paths["whisper"])
                self.encoder = whisper.encoder.to(self.device, dtype).eval()  # type: ignore[arg-type]
                wcfg = self.encoder.config
            else:
                wcfg = WhisperConfig.from_pretrained(paths["whisper"])
            self.features = AutoFeatureExtractor.from_pretrained(paths["whisper"])
        except MuseTalkError:
            raise
        except Exception as exc:
            raise MuseTalkError(f"cannot load MuseTalk from {self.root}: {exc}. "
                                + DOWNLOADS.format(root=self.root)) from exc
        self.dtype = dtype
        self.d_model = int(wcfg.d_model)
        self.layers = int(wcfg.encoder_layers) + 1  # embeddings + every layer: all hidden states
        # feature frames per second after the encoder's stride-2 convolution
        self.audio_fps = int(self.features.sampling_rate / self.features.hop_length / 2)
        vcfg = self.vae_config
        self.scaling = float(vcfg["scaling_factor"] if isinstance(vcfg, dict) else vcfg.scaling_factor)
        blocks = vcfg["block_out_channels"] if isinstance(vcfg, dict) else vcfg.block_out_channels
        self.latent_side = CROP // (2 ** (len(blocks) - 1))
        if int(config.get("cross_attention_dim", self.d_model)) != self.d_model:
            raise MuseTalkError(f"UNet cross_attention_dim {config.get('cross_attention_dim')} does not match "
                                f"Whisper d_model {self.d_model}")
        per_frame = self.audio_fps // VIDEO_FPS * (WINDOW_LEFT + WINDOW_RIGHT + 1)
        self.prompt_len = per_frame * self.layers
        self._pe = torch.from_numpy(positional_encoding(self.prompt_len, self.d_model)).to(self.device, dtype)

    def _face_parser(self) -> Any:
        """The BiSeNet face parser, or None (loudly: the blend mask loses its shape) without its checkpoint."""
        checkpoint = self.root / CHECKPOINT
        if not checkpoint.is_file():
            # once per weights folder and process: every session and slot loads its own MuseTalk
            level = logging.DEBUG if self.root in _WARNED_NO_PARSER else logging.WARNING
            _WARNED_NO_PARSER.add(self.root)
            log.log(level, "MuseTalk: %s is missing, so the blend mask falls back to the whole lower face box: "
                        "%s. Download face-parse-bisent/79999_iter.pth (and put it in %s) for MuseTalk's "
                        "own blending.", CHECKPOINT, "no jaw-mode chin coverage, seams along the cheeks and "
                        "the generated face's box edges may show" if self.parsing_mode == "jaw"
                        else "background and hair inside the box are blended too", self.root)
            return None
        from .faceparse import FaceParser

        return FaceParser(checkpoint, self.device, self.parsing_mode, self.cheek_width)

    # -- avatar -----------------------------------------------------------------------------------
    def prepare_face(self, frame: np.ndarray, box: tuple[int, int, int, int], blur: float = BLUR_REALTIME
                     ) -> PreparedFace:
        """Latents of the masked and the full crop (masked first: 8 channels) and the blend mask.

        The mask is built on the whole (unclipped) blend square, parsed with the image's outside
        black, as upstream; `blur` is BLUR_OFFLINE for whole-file rendering, BLUR_REALTIME live.
        """
        x1, y1, x2, y2 = box
        crop = cv2.resize(frame[y1:y2, x1:x2], (CROP, CROP), interpolation=cv2.INTER_LANCZOS4)
        region = blend_region(box, self.expand)
        parsed = None if self.parser is None else self.parser(padded_crop(frame, region))
        return PreparedFace(frame, box, self.encode_crop(crop), region, blend_mask(box, region, parsed, blur=blur))

    def prepare_faces(self, avatar: Any, cache_dir: Path | None = None,
                      progress: Callable[[int, int], None] | None = None, blur: float = BLUR_REALTIME
                      ) -> list[PreparedFace]:
        """Every frame of an avatar prepared, in MuseTalk's ping-pong order; the latents and masks are
        cached on disk keyed by the avatar and by what shapes them (VAE, face parsing, version, blur)."""
        import hashlib

        import torch

        frames = avatar.frames
        cache = None
        if avatar.key:
            from streams import default_state_dir

            parts = [self.version, self.seed, self.expand, blur, self.parsing_mode, self.cheek_width,
                     self.parser is not None, "unclipped",
                     json.dumps(dict(self.vae.config), sort_keys=True, default=str)]
            for f in [*sorted((self.root / "sd-vae").glob("*")), self.root / CHECKPOINT]:
                if f.is_file():
                    st = f.stat()
                    parts += [f.name, st.st_size, st.st_mtime_ns]
            digest = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]
            cache = (cache_dir or default_state_dir() / "avatars") / f"{avatar.name}.{avatar.key}.{digest}.npz"
        if cache is not None and cache.is_file():
            with np.load(cache) as z:
                latents, crops = z["latents"], z["crops"]
                masks = [z[f"mask_{i}"] for i in range(len(frames))]
            prepared = [
                PreparedFace(
                    a.image,
                    a.box,
                    torch.from_numpy(latents[i]).to(self.device, self.dtype),
                    tuple(int(v) for v in crops[i]),
                    masks[i],
                )
                for i, a in enumerate(frames)
            ]
            return ping_pong(prepared)
        prepared = []
        for i, a in enumerate(frames):
            prepared.append(self.prepare_face(a.image, a.box, blur))
            if progress is not None:
                progress(i + 1, len(frames))
        if cache is not None:
            from .avatar import write_cache

            arrays: dict[str, np.ndarray] = {f"mask_{i}": p.mask for i, p in enumerate(prepared)}
            arrays["latents"] = np.stack([p.latents.float().cpu().numpy() for p in prepared])
            arrays["crops"] = np.array([p.crop for p in prepared])

            def write(tmp: Path) -> None:
                with tmp.open("wb") as fh:
                    np.savez(fh, **arrays)  # type: ignore[arg-type]

            write_cache(cache, write, f"avatar {avatar.name}: MuseTalk latents cache")
        return ping_pong(prepared)

    def encode_crop(self, crop_bgr: np.ndarray) -> Any:
        import torch

        rgb = cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        full = torch.from_numpy(rgb).permute(2, 0, 1)  # 3 x 256 x 256 in [0, 1]
        masked = full * torch.from_numpy(lower_half_mask(full.shape[-1]))
        x = torch.stack([masked, full]) * 2.0 - 1.0  # normalise to [-1, 1]: the masked half becomes -1
        gen = torch.Generator().manual_seed(self.seed)
        with torch.inference_mode():
            dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
            noise = torch.randn(dist.mean.shape, generator=gen).to(self.device, self.dtype)
            latents = (dist.mean + dist.std * noise) * self.scaling  # a sample, as MuseTalk draws it
        return torch.cat([latents[0:1], latents[1:2]], dim=1)  # masked first

    # -- audio ------------------------------------------------------------------------------------
    def log_mel(self, samples: np.ndarray, sample_rate: int = 16_000) -> Any:
        """Whisper's log-mel input for up to 30 s of audio, padded to 30 s, as the feature extractor
        makes it, without computing the spectrogram of the padding: a live block of a few seconds
        would otherwise pay for 30 s of STFT every time.

        Exact: the STFT runs over the samples and one window of zeros after them (so every frame that
        touches a sample sees what it would see in the padded input); the frames after that are the
        spectrogram of silence, whose value after Whisper's normalisation (clamped at the maximum
        minus 8, then (x + 4) / 4) is max(-1.5, max - 2) of the normalised frames.
        """
        import torch

        fx = self.features
        if len(samples) >= fx.n_samples:
            return fx(samples, sampling_rate=sample_rate, return_tensors="pt").input_features
        tail = np.zeros(len(samples) + fx.n_fft, np.float32)
        tail[: len(samples)] = samples
        mel = fx(tail, sampling_rate=sample_rate, return_tensors="pt", padding="longest").input_features
        mel = mel[..., : fx.nb_max_frames]
        out = torch.full((1, mel.shape[1], fx.nb_max_frames), float(max(-1.5, float(mel.max()) - 2.0)), dtype=mel.dtype)
        out[..., : mel.shape[-1]] = mel
        return out

    def audio_prompts(self, samples: np.ndarray, sample_rate: int = 16_000) -> Any:
        """(frames, 10 x layers, d_model) prompts for `samples` (16 kHz mono float32), one per 25 fps frame."""
        import torch

        seg = 30 * sample_rate
        feats = []
        with torch.inference_mode():
            for i in range(0, max(len(samples), 1), seg):
                mel = self.log_mel(samples[i : i + seg], sample_rate)
                hidden = self.encoder(mel.to(self.device, self.dtype), output_hidden_states=True).hidden_states
                feats.append(torch.stack(hidden, dim=2))  # 1 x T x layers x d_model
        whole = torch.cat(feats, dim=1)
        # integer arithmetic: 28 chunks of 640 samples are 1.12 s, and 1.12 * 25 is 27.999... in floats
        frames = len(samples) * VIDEO_FPS // sample_rate
        whole = whole[:, : -(-len(samples) * self.audio_fps // sample_rate)]
        per = self.audio_fps // VIDEO_FPS
        # padding of its own length: slicing `whole` gave a short clip fewer rows than the window needs
        # (one frame: 2 + 2 instead of 4 before and 12 after), a short prompt, and a failed UNet call
        left = whole.new_zeros(whole.shape[0], per * WINDOW_LEFT, *whole.shape[2:])
        right = whole.new_zeros(whole.shape[0], per * 3 * WINDOW_RIGHT, *whole.shape[2:])
        padded = torch.cat([left, whole, right], dim=1)
        out = []
        for f in range(frames):
            idx = window_indices(f, self.audio_fps)
            clip = padded[:, idx.start : idx.stop]  # 1 x 10 x layers x d
            out.append(clip.reshape(1, -1, self.d_model))
        return torch.cat(out, dim=0) if out else torch.zeros(0, self.prompt_len, self.d_model)

    # -- generation -------------------------------------------------------------------------------
    def generate(self, faces: list[PreparedFace], prompts: Any) -> list[np.ndarray]:
        """One UNet step at timestep 0 and a VAE decode for a batch; returns the blended frames."""
        generated = self.generate_faces([f.latents for f in faces], prompts)
        return [self.paste(f, g) for f, g in zip(faces, generated, strict=True)]

    def generate_faces(self, latents: list[Any], prompts: Any) -> list[np.ndarray]:
        """The model part of a batch: UNet at timestep 0 + VAE decode -> 256x256 BGR faces.

        This is what a lipsync executor slot runs; blending them back (`paste`) is left to the
        caller's thread, so the slot's worker only does model work.
        """
        import torch

        with torch.inference_mode():
            x = torch.cat(list(latents)).to(self.device, self.dtype)
            prompts = torch.stack(list(prompts)) if isinstance(prompts, (list, tuple)) else prompts
            audio = prompts.to(self.device, self.dtype) + self._pe
            t = torch.zeros(1, device=self.device, dtype=torch.long)
            pred = self.unet(x, t, encoder_hidden_states=audio).sample
            image = self.vae.decode(pred / self.scaling).sample
            image = (image / 2 + 0.5).clamp(0, 1)
            faces_rgb = (image.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
        return [np.ascontiguousarray(f[..., ::-1]) for f in faces_rgb]

    def memory_bytes(self) -> int:
        """Bytes of the loaded weights (UNet, VAE, Whisper encoder): the floor of a slot's memory."""
        return sum(
            p.numel() * p.element_size()
            for m in (self.unet, self.vae, self.encoder)
            if m is not None
            for p in m.parameters()
        )

    @staticmethod
    def paste(face: PreparedFace, generated_bgr: np.ndarray) -> np.ndarray:
        """Put the generated face into its box, then blend the blend square through the mask (only
        its part inside the image: the square may reach outside)."""
        out = face.frame.copy()
        h, w = out.shape[:2]
        x1, y1, x2, y2 = face.box
        cx1, cy1, cx2, cy2 = face.crop
        ix1, iy1, ix2, iy2 = max(0, cx1), max(0, cy1), min(w, cx2), min(h, cy2)
        large = out[iy1:iy2, ix1:ix2].copy()
        gen = cv2.resize(np.ascontiguousarray(generated_bgr), (x2 - x1, y2 - y1))
        gx1, gy1, gx2, gy2 = max(x1, ix1), max(y1, iy1), min(x2, ix2), min(y2, iy2)
        large[gy1 - iy1 : gy2 - iy1, gx1 - ix1 : gx2 - ix1] = gen[gy1 - y1 : gy2 - y1, gx1 - x1 : gx2 - x1]
        a = (face.mask[iy1 - cy1 : iy2 - cy1, ix1 - cx1 : ix2 - cx1].astype(np.float32) / 255.0)[..., None]
        out[iy1:iy2, ix1:ix2] = (large * a + out[iy1:iy2, ix1:ix2] * (1 - a)).round().astype(np.uint8)
        return out


class MuseTalkSlotModel:
    """MuseTalk behind the executor-slot protocol (load / warmup / infer / close).

    `infer(jobs)` runs one UNet + VAE batch over jobs of any sessions and returns their 256x256
    BGR faces. `threads` caps torch's intra-op threads on a CPU slot (the slot's share of the cores).
    """

    kind = "lipsync"

    def __init__(
        self,
        root: str | Path,
        version: str = VERSION,
        device: str = "cpu",
        half: bool | None = None,
        threads: int | None = None,
        whisper: bool = False,
    ) -> None:
        """`whisper`: this slot also holds the Whisper encoder and computes the prompts of jobs that
        carry their audio window (`lipsync.whisper = "slot"`: on a GPU, next to the UNet and VAE)."""
        self.model = MuseTalk(
            root, version, device=device, half=half, parts={"unet", "vae", "whisper"} if whisper else {"unet", "vae"}
        )
        self.threads = threads
        self.whisper = whisper
        self.activation_bytes = 0

    def load(self) -> None:
        if self.threads and self.model.device == "cpu":
            import torch

            torch.set_num_threads(self.threads)
        self.model.load()

    def warmup(self) -> None:
        import torch

        m = self.model
        latents = torch.zeros(1, 8, m.latent_side, m.latent_side)
        cuda = m.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(m.device)
            before = torch.cuda.memory_allocated(m.device)
        if self.whisper:
            self.infer([LipSyncJob(latents, None, AudioWindow(np.zeros(640, np.float32), 0))])
        else:
            self.infer([LipSyncJob(latents, torch.zeros(m.prompt_len, m.d_model))])
        if cuda:  # activations of one frame on top of the weights (per-device figure: approximate)
            self.activation_bytes = max(0, torch.cuda.max_memory_allocated(m.device) - before)

    def infer(self, jobs: list[LipSyncJob]) -> list[np.ndarray]:
        return self.model.generate_faces([j.latents for j in jobs], self.prompts(jobs))

    def prompts(self, jobs: list[LipSyncJob]) -> list[Any]:
        """Each job's prompt: given, or computed here from its audio window (once per window)."""
        computed: dict[int, Any] = {}
        out = []
        for j in jobs:
            if j.prompt is not None:
                out.append(j.prompt)
                continue
            if j.audio is None or not self.whisper:
                raise MuseTalkError(
                    "a lipsync job without its prompt reached a slot without Whisper "
                    "(lipsync.whisper must be the same for the whole pool)"
                )
            key = id(j.audio.samples)
            if key not in computed:
                computed[key] = self.model.audio_prompts(j.audio.samples)
            out.append(computed[key][j.audio.frame])
        return out

    def close(self) -> None:
        self.model.unet = None

    def memory_bytes(self) -> int:
        """Weights, plus on CUDA the activations of the warm-up frame (batches need more)."""
        return self.model.memory_bytes() + self.activation_bytes


def ping_pong(frames: list[Any]) -> list[Any]:
    """MuseTalk's avatar frame order: forward then backward, so a loop has no jump."""
    return frames + frames[::-1]
