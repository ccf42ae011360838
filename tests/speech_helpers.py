"""What the speech tests share: the committed tiny corpus, its spectrogram settings, and a small speech
model/guide pair with a non-trivial flow."""

from __future__ import annotations

from pathlib import Path

import torch

from pyro_vits.data.speech_batches import SpeechConfig
from pyro_vits.data.text import VITS_SYMBOLS
from pyro_vits.models import speech_model_and_guide

TINY = Path(__file__).resolve().parent / "fixtures" / "tiny_corpus"
SPEECH = SpeechConfig(filter_length=256, hop_length=128, win_length=256)
SIZES = dict(inter_channels=6, hidden_channels=16, filter_channels=24, n_heads=2, n_layers=2, flow_n_layers=2,
             n_flows=2, decoder_channels=12, guide_layers=2)


def make_pair(mean_only: bool, speakers: int, seed: int = 0, randomize: bool = True):
    torch.manual_seed(seed)
    model, guide = speech_model_and_guide(len(VITS_SYMBOLS), SPEECH.n_freq, mean_only=mean_only,
                                          n_speakers=speakers, gin_channels=4 if speakers else 0, **SIZES)
    if randomize:  # VITS zero-initialises the couplings' post conv: make the flow non-trivial
        with torch.no_grad():
            for layer in model.flow.flows[::2]:
                layer.post.weight.normal_(0, 0.3)
                layer.post.bias.normal_(0, 0.3)
    return model, guide
