"""The small transformers ``VitsConfig`` the HuggingFace layout tests build their ``VitsModel`` from (no download)."""

CONFIG = dict(
    vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, window_size=4, ffn_dim=12,
    ffn_kernel_size=3, flow_size=6, spectrogram_bins=17, upsample_initial_channel=16, upsample_rates=[4, 2],
    upsample_kernel_sizes=[8, 4], resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 3, 5], [1, 2, 3]],
    prior_encoder_num_flows=3, prior_encoder_num_wavenet_layers=2, posterior_encoder_num_wavenet_layers=3,
    wavenet_kernel_size=5, num_speakers=3, speaker_embedding_size=5, duration_predictor_filter_channels=8,
    depth_separable_channels=2, duration_predictor_num_flows=1, duration_predictor_flow_bins=4,
)
