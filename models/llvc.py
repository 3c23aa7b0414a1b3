"""The LLVC network (Sadov et al., arXiv 2311.00873), state-dict compatible with upstream.

Module and parameter names mirror upstream KoeAI/LLVC exactly (``convnet_pre.down_convs.N``,
``in_conv.0``, ``label_embedding.N``, ``mask_gen.encoder.dcc_layers.dcc_N.layers.N``,
``mask_gen.decoder.tf_dec_layers.N``, ``out_conv.0``), so a published ``G_500000.pth`` loads
with strict key matching. The math follows upstream's ``model.py``/``cached_convnet.py``; the
code is our own. Every stateful block takes and updates its context buffer explicitly, so the
same modules serve the offline forward here and the exact streaming step in
:mod:`models.streaming`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, PrenetConfig


class LayerNormChannels(nn.LayerNorm):
    """LayerNorm over the channel axis of a ``[B, C, T]`` tensor."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


# --------------------------------------------------------------------------- pre-net
class GatedResidualBlock(nn.Module):
    """``x[crop:] + tanh(filter(x)) * sigmoid(gate(x))``: upstream's pre-net residual block."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int, dropout: float):
        super().__init__()
        self.filter = nn.Conv1d(in_ch, out_ch, kernel, dilation=dilation)
        self.gate = nn.Conv1d(in_ch, out_ch, kernel, dilation=dilation)
        self.dropout = nn.Dropout1d(dropout)
        self.crop = dilation * (kernel - 1)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        residual = torch.tanh(self.filter(x)) * torch.sigmoid(self.gate(x))
        # Channels of x are zero-padded (or cut) to the block's output width, as upstream does.
        x = F.pad(x, (0, 0, 0, residual.shape[1] - x.shape[1]))
        return self.dropout(x[..., self.crop:] + residual)


class CausalConvBlock(nn.Module):
    """Conv + BatchNorm + LeakyReLU: the pre-net block when ``use_residual_blocks`` is false."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int, dropout: float):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(in_ch, out_ch, kernel, dilation=dilation),
            nn.BatchNorm1d(out_ch),
            nn.Dropout1d(dropout),
            nn.LeakyReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.conv(x)


class CachedConvNet(nn.Module):
    """Stack of causal convolutions whose left context lives in one cache tensor.

    The cache is ``[B, max(out_channels), sum((k - 1) * d)]``; layer ``i`` owns the slice
    ``[buf_start[i], buf_start[i] + buf_len[i])`` and the first ``in_channels`` rows of it.
    """

    def __init__(self, cfg: PrenetConfig, in_channels: int = 1):
        super().__init__()
        self.combine = cfg.combine_residuals
        self.ctx_height = max(cfg.out_channels)
        self.buf_lengths = [(k - 1) * d for k, d in zip(cfg.kernel_sizes, cfg.dilations)]
        self.buf_starts = [sum(self.buf_lengths[:i]) for i in range(len(self.buf_lengths))]
        block = GatedResidualBlock if cfg.use_residual_blocks else CausalConvBlock
        chans = [in_channels, *cfg.out_channels]
        self.down_convs = nn.ModuleList(
            block(chans[i], chans[i + 1], k, d, cfg.dropout)
            for i, (k, d) in enumerate(zip(cfg.kernel_sizes, cfg.dilations)))

    def init_ctx(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """A zeroed cache (silence before the first sample)."""
        return torch.zeros(batch, self.ctx_height, sum(self.buf_lengths), device=device)

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        """Run ``x`` ``[B, C, T]`` through the stack, updating ``ctx`` in place."""
        for i, layer in enumerate(self.down_convs):
            lo, n = self.buf_starts[i], self.buf_lengths[i]
            rows = x.shape[1]
            conv_in = torch.cat((ctx[:, :rows, lo:lo + n], x), dim=-1)
            if n:
                ctx[:, :rows, lo:lo + n] = conv_in[..., -n:]
            out = layer(conv_in)
            if self.combine == "add":
                x = x + out
            elif self.combine == "multiply":
                x = x * out
            else:
                x = out
        return x


# --------------------------------------------------------------------------- encoder
class DepthwiseSeparableConv(nn.Module):
    """Depthwise dilated conv, LayerNorm, ReLU, pointwise conv, LayerNorm, ReLU."""

    def __init__(self, channels: int, kernel: int, dilation: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv1d(channels, channels, kernel, groups=channels, dilation=dilation),
            LayerNormChannels(channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=1),
            LayerNormChannels(channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.layers(x)


class DilatedCausalConvEncoder(nn.Module):
    """Residual stack of dilated causal depthwise-separable convs (dilation ``2**i``).

    Context buffer ``[B, C, (k - 1) * (2**n - 1)]`` (``[B, 512, 510]`` by default); layer ``i``
    owns ``(k - 1) * 2**i`` frames of it.
    """

    def __init__(self, channels: int, num_layers: int, kernel: int = 3):
        super().__init__()
        self.channels = channels
        self.buf_lengths = [(kernel - 1) * 2 ** i for i in range(num_layers)]
        self.buf_starts = [sum(self.buf_lengths[:i]) for i in range(num_layers)]
        self.buf_size = sum(self.buf_lengths)
        self.dcc_layers = nn.Sequential()
        for i in range(num_layers):
            self.dcc_layers.add_module(f"dcc_{i}", DepthwiseSeparableConv(channels, kernel, 2 ** i))

    def init_ctx(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """A zeroed context buffer."""
        return torch.zeros(batch, self.channels, self.buf_size, device=device)

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        """Encode ``x`` ``[B, C, T]``; ``ctx`` is updated in place."""
        for layer, lo, n in zip(self.dcc_layers, self.buf_starts, self.buf_lengths):
            dcc_in = torch.cat((ctx[..., lo:lo + n], x), dim=-1)
            ctx[..., lo:lo + n] = dcc_in[..., -n:]
            x = x + layer(dcc_in)
        return x


# --------------------------------------------------------------------------- decoder
class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sin/cos table (sin on even dims, cos on odd), kept as a persistent buffer ``pe``."""

    def __init__(self, dim: int, max_len: int = 200):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(max_len, dim)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq)
        self.register_buffer("pe", pe.unsqueeze(0))

    def forward(self, x: Tensor) -> Tensor:
        """The table rows for a ``[N, T, C]`` input (to be added to it)."""
        return self.pe[:, : x.shape[1]]


class WindowedDecoderLayer(nn.TransformerDecoderLayer):
    """Transformer decoder layer that decodes only the last ``chunk`` tokens of each window.

    Queries are the window's last ``chunk`` tokens; keys are the whole window (its buffered
    past plus the chunk itself), unmasked: inside a chunk every frame sees every other frame,
    which is why the decoder's windows must sit on the same grid when streaming.
    """

    def forward(self, tgt: Tensor, memory: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        """``tgt``/``memory`` ``[N, ctx + chunk, C]`` windows → ``[N, chunk, C]``."""
        q = tgt[:, -chunk:]
        q = self.norm1(q + self.dropout1(self.self_attn(q, tgt, tgt, need_weights=False)[0]))
        q = self.norm2(q + self.dropout2(self.multihead_attn(q, memory, memory, need_weights=False)[0]))
        ff = self.linear2(self.dropout(self.activation(self.linear1(q))))
        return self.norm3(q + self.dropout3(ff))


class CausalTransformerDecoder(nn.Module):
    """Decodes frames in windows of ``chunk`` frames, each seeing ``ctx_len`` buffered frames.

    Context buffer ``[B, num_layers + 1, ctx_len, C]``: slot 0 holds past encoder frames (the
    memory), slot ``i + 1`` the past inputs of layer ``i``.
    """

    def __init__(self, dim: int, ctx_len: int, chunk: int, num_layers: int, nhead: int,
                 use_pos_enc: bool, ff_dim: int, dropout: float):
        super().__init__()
        self.dim, self.ctx_len, self.chunk, self.num_layers = dim, ctx_len, chunk, num_layers
        self.use_pos_enc = use_pos_enc
        self.pos_enc = SinusoidalPositionalEncoding(dim, max_len=200)
        self.tf_dec_layers = nn.ModuleList(
            WindowedDecoderLayer(d_model=dim, nhead=nhead, dim_feedforward=ff_dim,
                                 dropout=dropout, batch_first=True)
            for _ in range(num_layers))

    def init_ctx(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """A zeroed context buffer."""
        return torch.zeros(batch, self.num_layers + 1, self.ctx_len, self.dim, device=device)

    def _windows(self, seq: Tensor) -> Tensor:
        """``[B, ctx + T, C]`` → ``[B * T/chunk, ctx + chunk, C]`` overlapping windows."""
        win = seq.unfold(1, self.ctx_len + self.chunk, self.chunk)  # [B, nW, C, W]
        return win.permute(0, 1, 3, 2).reshape(-1, self.ctx_len + self.chunk, self.dim)

    def forward(self, tgt: Tensor, mem: Tensor, ctx: Tensor) -> Tensor:
        """Decode ``tgt`` against ``mem`` (both ``[B, C, T]``); ``ctx`` is updated in place.

        ``T`` is zero-padded up to a whole number of windows (offline only; a stream always
        passes whole windows) and the padding is removed from the result.
        """
        B, _, T = tgt.shape
        pad = -T % self.chunk
        if pad:
            tgt, mem = F.pad(tgt, (0, pad)), F.pad(mem, (0, pad))
        mem = torch.cat((ctx[:, 0], mem.transpose(1, 2)), dim=1)
        ctx[:, 0] = mem[:, -self.ctx_len:]
        mem_win = self._windows(mem)
        if self.use_pos_enc:
            mem_win = mem_win + self.pos_enc(mem_win)
        x = tgt.transpose(1, 2)
        for i, layer in enumerate(self.tf_dec_layers):
            x = torch.cat((ctx[:, i + 1], x), dim=1)
            ctx[:, i + 1] = x[:, -self.ctx_len:]
            win = self._windows(x)
            if self.use_pos_enc and i == 0:
                win = win + self.pos_enc(win)
            x = layer(win, mem_win, self.chunk).reshape(B, T + pad, self.dim)
        return x.transpose(1, 2)[..., :T]


class GroupedPointwise(nn.Sequential):
    """Grouped 1x1 conv + ReLU (upstream's ``proj_*`` blocks; index 0 is the conv).

    PyTorch's CPU convolution runs a grouped conv one group at a time: with 256 groups of one
    or two channels the three projections were ~30% of a streaming step. The same weights
    applied as a broadcast multiply-add give the same result (to float rounding) in a few
    kernels. ``upstream_math = True`` restores the plain ``nn.Conv1d`` call.
    """

    upstream_math = False

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__(nn.Conv1d(in_ch, out_ch, kernel_size=1, groups=groups), nn.ReLU())
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        conv = self[0]
        if self.upstream_math:
            return self[1](conv(x))
        B, _, T = x.shape
        g = self.groups
        w = conv.weight.view(g, -1, conv.in_channels // g, 1)      # [G, out/G, in/G, 1]
        xg = x.reshape(B, g, 1, conv.in_channels // g, T)          # [B, G, 1, in/G, T]
        y = (w * xg).sum(3).reshape(B, conv.out_channels, T)
        return torch.relu(y + conv.bias.view(1, -1, 1))


class MaskNet(nn.Module):
    """Encoder + label integration + windowed transformer decoder → a multiplicative mask."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.skip_connection, self.proj = cfg.skip_connection, cfg.proj
        self.encoder = DilatedCausalConvEncoder(cfg.enc_dim, cfg.num_enc_layers)
        self.proj_e2d_e = GroupedPointwise(cfg.enc_dim, cfg.dec_dim, cfg.dec_dim)
        self.proj_e2d_l = GroupedPointwise(cfg.enc_dim, cfg.dec_dim, cfg.dec_dim)
        self.proj_d2e = GroupedPointwise(cfg.dec_dim, cfg.enc_dim, cfg.dec_dim)
        self.decoder = CausalTransformerDecoder(
            cfg.dec_dim, cfg.dec_buf_len, cfg.dec_chunk_size, cfg.num_dec_layers, nhead=8,
            use_pos_enc=cfg.use_pos_enc, ff_dim=2 * cfg.dec_dim, dropout=cfg.decoder_dropout)

    def forward(self, x: Tensor, label: Tensor, enc_ctx: Tensor, dec_ctx: Tensor) -> Tensor:
        """Mask for frames ``x`` ``[B, enc_dim, T]`` given the label embedding ``[B, enc_dim]``."""
        e = self.encoder(x, enc_ctx)
        labeled = label.unsqueeze(2) * e
        if self.proj:
            m = self.proj_d2e(self.decoder(self.proj_e2d_l(labeled), self.proj_e2d_e(e), dec_ctx))
        else:
            m = self.decoder(labeled, e, dec_ctx)
        return labeled + m if self.skip_connection else m


# --------------------------------------------------------------------------- network
class LLVC(nn.Module):
    """The whole network. ``forward(x)`` is upstream's offline forward (``pad=True``).

    ``x``: ``[B, 1, T]`` audio at 16 kHz → ``[B, 1, T]`` converted audio, sample-aligned.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.L = cfg.L
        self.dec_chunk_size = cfg.dec_chunk_size
        self.out_buf_len = cfg.out_buf_len
        self.enc_dim = cfg.enc_dim
        self.lookahead = cfg.lookahead
        if cfg.convnet_config.convnet_prenet:
            self.convnet_pre = CachedConvNet(cfg.convnet_config)
        self.in_conv = nn.Sequential(
            nn.Conv1d(1, cfg.enc_dim, kernel_size=self.in_kernel, stride=cfg.L, bias=False),
            nn.ReLU())
        # Upstream hard-codes a 1-dim label and a 512-wide hidden layer here.
        self.label_embedding = nn.Sequential(
            nn.Linear(1, 512), nn.LayerNorm(512), nn.ReLU(),
            nn.Linear(512, cfg.enc_dim), nn.LayerNorm(cfg.enc_dim), nn.ReLU())
        self.mask_gen = MaskNet(cfg)
        self.out_conv = nn.Sequential(
            nn.ConvTranspose1d(cfg.enc_dim, 1, kernel_size=(cfg.out_buf_len + 1) * cfg.L,
                               stride=cfg.L, padding=cfg.out_buf_len * cfg.L, bias=False),
            nn.Tanh())

    # Geometry of the input side, read by the streaming engine.
    @property
    def in_kernel(self) -> int:
        """``in_conv`` kernel (:attr:`ModelConfig.in_kernel`)."""
        return self.cfg.in_kernel

    @property
    def left_pad(self) -> int:
        """Offline's left padding (:attr:`ModelConfig.left_pad`)."""
        return self.cfg.left_pad

    @property
    def has_prenet(self) -> bool:
        """Whether the cached convnet pre-net is part of this model."""
        return hasattr(self, "convnet_pre")

    def label_vector(self, batch: int, device: torch.device | str) -> Tensor:
        """The label embedding ``[B, enc_dim]`` (upstream always uses label 0)."""
        return self.label_embedding(torch.zeros(batch, 1, device=device))

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Zeroed per-stream buffers: ``enc`` [B,512,510], ``dec`` [B,2,13,256], ``out`` [B,512,4],
        ``prenet`` [B,1,24] (absent without pre-net)."""
        state = {
            "enc": self.mask_gen.encoder.init_ctx(batch, device),
            "dec": self.mask_gen.decoder.init_ctx(batch, device),
            "out": torch.zeros(batch, self.enc_dim, self.out_buf_len, device=device),
        }
        if self.has_prenet:
            state["prenet"] = self.convnet_pre.init_ctx(batch, device)
        return state

    def apply_prenet(self, x: Tensor, state: dict[str, Tensor]) -> Tensor:
        """``x`` combined with the pre-net's output per ``skip_connection`` (identity without pre-net)."""
        if not self.has_prenet:
            return x
        y = self.convnet_pre(x, state["prenet"])
        skip = self.cfg.convnet_config.skip_connection
        return x + y if skip == "add" else x * y if skip == "multiply" else y

    def frames_to_audio(self, frames: Tensor, label: Tensor, state: dict[str, Tensor]) -> Tensor:
        """``in_conv`` frames ``[B, enc_dim, T]`` → ``T * L`` output samples; updates state."""
        mask = self.mask_gen(frames, label, state["enc"], state["dec"])
        masked = torch.cat((state["out"], frames * mask), dim=-1)
        if self.out_buf_len:
            state["out"].copy_(masked[..., -self.out_buf_len:])
        return self.out_conv(masked)

    def forward(self, x: Tensor) -> Tensor:
        """Offline conversion of a whole signal, exactly as upstream's ``Net(x, pad=True)``."""
        T = x.shape[-1]
        # Pad to a whole number of hops, then L zeros each side (lookahead) as upstream does.
        x = F.pad(x, (self.left_pad, -T % self.L + self.left_pad))
        state = self.init_state(x.shape[0], x.device)
        frames = self.in_conv(self.apply_prenet(x, state))
        y = self.frames_to_audio(frames, self.label_vector(x.shape[0], x.device), state)
        return y[..., :T]
