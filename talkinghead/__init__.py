"""Talking heads: turn audio into a lip-synced avatar video, streamed out live with its sound.

Avatar preparation (dlib landmarks, MuseTalk's crop rule, cached), audio inputs (file, FFmpeg
URL, pushed PCM), sessions with one 40 ms audio chunk per video frame, and two backends: the
light `energy` one (loudness-driven mouth, no weights) and MuseTalk (v1.5 / v1.0, from a local
weights folder), whose model work runs on lipsync executor slots (`pipeline.talk.lipsync`) live, or
split into segments across them offline. Sinks are `streams.sinks.AVSink`.
"""

from .audio import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, AudioError, PushAudio, load_audio
from .avatar import Avatar, AvatarError, musetalk_box, prepare_avatar
from .energy import EnergyLipSync
from .session import TalkSession

__all__ = [
    "FPS",
    "SAMPLES_PER_FRAME",
    "SAMPLE_RATE",
    "AudioError",
    "Avatar",
    "AvatarError",
    "EnergyLipSync",
    "PushAudio",
    "TalkSession",
    "load_audio",
    "musetalk_box",
    "prepare_avatar",
]
