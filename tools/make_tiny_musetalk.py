"""Write tiny, randomly initialised MuseTalk-shaped models in the official folder layout.

    .venv/bin/python -m tools.make_tiny_musetalk OUT_DIR [--version v15|v1] [--seed 0]

The same classes as the real weights (diffusers UNet2DConditionModel and AutoencoderKL,
transformers WhisperModel and its feature extractor), a few channels wide, so the whole
talking-head pipeline loads through the real loader and runs on a CPU in seconds. Their output
is noise: they test plumbing and shapes, not lip shapes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def make(out: Path, version: str = "v15", seed: int = 0, face_parse: bool = False, whisper: str = "tiny") -> Path:
    """Write the models; `face_parse` adds a randomly initialised face-parsing BiSeNet checkpoint
    (the real architecture, which has one fixed size: about 50 MB); `whisper = "tiny-shape"` gives
    the encoder whisper-tiny's own shape (4 layers, d_model 384, 6 heads: what MuseTalk v1.5 runs),
    randomly initialised, instead of 2 layers of 32."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(seed)
    d_model, layers, heads = (384, 4, 6) if whisper == "tiny-shape" else (32, 2, 2)
    encoder = WhisperModel(WhisperConfig(
        d_model=d_model, encoder_layers=layers, encoder_attention_heads=heads, decoder_layers=1,
        decoder_attention_heads=heads, encoder_ffn_dim=4 * d_model if layers == 4 else 64, decoder_ffn_dim=64,
        num_mel_bins=80, max_source_positions=1500, vocab_size=64, max_target_positions=32, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    encoder.save_pretrained(out / "whisper")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out / "whisper")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae.save_pretrained(out / "sd-vae")
    config = {
        "sample_size": 32, "in_channels": 8, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [16, 32], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": d_model,
        "attention_head_dim": 4, "norm_num_groups": 8,
    }
    unet = UNet2DConditionModel(**config)
    folder, weights = ("musetalkV15", "unet.pth") if version == "v15" else ("musetalk", "pytorch_model.bin")
    (out / folder).mkdir(parents=True, exist_ok=True)
    (out / folder / "musetalk.json").write_text(json.dumps(config, indent=2))
    torch.save(unet.state_dict(), out / folder / weights)
    if face_parse:
        from talkinghead.faceparse import CHECKPOINT, build_bisenet

        (out / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
        torch.save(build_bisenet().state_dict(), out / CHECKPOINT)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--version", choices=["v15", "v1"], default="v15")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--face-parse", action="store_true", help="also a random face-parsing BiSeNet checkpoint")
    ap.add_argument("--whisper", choices=["tiny", "tiny-shape"], default="tiny",
                    help="tiny-shape: the encoder in whisper-tiny's shape (4 layers, d_model 384)")
    a = ap.parse_args()
    print(make(a.out, a.version, a.seed, a.face_parse, a.whisper))
