"""A tiny random voice for the refit tests: VITS's text encoder, flow, HiFi-GAN decoder (hop 128, the tiny
corpus's STFT) and a speaker embedding, written as a VITS generator file without enc_q."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pyro_vits.data.text import VITS_SYMBOLS
from pyro_vits.flows import ResidualCouplingBlock
from pyro_vits.nn.hifigan import Generator
from pyro_vits.nn.text_encoder import TextEncoder
from pyro_vits.vits.export import decoder_config, export_vits_parts

INTER, HIDDEN, GIN = 6, 16, 4
DEC = dict(resblock="1", resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], upsample_rates=[8, 16],
           upsample_initial_channel=16, upsample_kernel_sizes=[16, 32])


def tiny_parts(speakers: int = 2, seed: int = 0) -> dict[str, nn.Module | None]:
    torch.manual_seed(seed)
    gin = GIN if speakers else 0
    parts = dict(
        enc_p=TextEncoder(len(VITS_SYMBOLS), INTER, HIDDEN, 24, 2, 2, 3, 0.0),
        flow=ResidualCouplingBlock(INTER, HIDDEN, 5, 1, 2, 2, gin_channels=gin, mean_only=True),
        dec=Generator(INTER, **DEC, gin_channels=gin),
        emb_g=nn.Embedding(speakers, gin) if speakers else None,
    )
    with torch.no_grad():  # VITS zero-initialises the couplings' post conv: make the flow non-trivial
        for layer in parts["flow"].flows[::2]:
            layer.post.weight.normal_(0, 0.3)
            layer.post.bias.normal_(0, 0.3)
    return parts


def write_tiny_voice(folder: Path, speakers: int = 2) -> Path:
    """``folder/vits/G_0.pth`` + ``config.json`` (filter_length 256, hop 128); returns the checkpoint."""
    parts = tiny_parts(speakers)
    config = {
        "data": {"sampling_rate": 22050, "filter_length": 256, "hop_length": 128, "win_length": 256,
                 "add_blank": True, "n_speakers": speakers},
        "model": {"inter_channels": INTER, "hidden_channels": HIDDEN, "filter_channels": 24, "n_heads": 2,
                  "n_layers": 2, "kernel_size": 3, "p_dropout": 0.0, "gin_channels": GIN if speakers else 0,
                  **decoder_config(parts["dec"])},
    }
    return export_vits_parts(folder, 0, parts, config)
