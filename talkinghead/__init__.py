"""Talking heads: turn audio into a lip-synced avatar video, streamed out live with its sound.

Today: avatar preparation (dlib landmarks, MuseTalk's crop rule, cached), audio inputs (file,
FFmpeg URL, pushed PCM), the `energy` backend, live and offline sessions, and A/V sinks
(`streams.sinks`). The MuseTalk backend is not implemented yet.
"""

from .audio import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, AudioError, PushAudio, load_audio
from .avatar import Avatar, AvatarError, musetalk_box, prepare_avatar
from .energy import EnergyLipSync
from .session import TalkSession

__all__ = [
    "FPS",
    "SAMPLES_PER_FRAME",
    "SAMPLE_RATE",
    "Avatar",
    "AvatarError",
    "AudioError",
    "EnergyLipSync",
    "PushAudio",
    "TalkSession",
    "load_audio",
    "musetalk_box",
    "prepare_avatar",
]
