"""The exact streaming step, restructured for speed: time-major, constants folded, no grouped convs.

:class:`FastStep` is a pure function ``(chunk, *state) -> (audio, *new_state)`` built from an
:class:`models.llvc.LLVC`'s own weights (nothing is trained or stored twice) and equal to the
plain streaming step to float rounding; ``llvc export`` turns it into the ONNX graph and tests
hold it to the reference model. What differs from the module code, and why (measured on ONNX
Runtime, 1 thread, chunk factor 1; design notes section 5):

* **Time-major** ``[T, C]`` activations: LayerNorm normalises the last axis with no transposes,
  and every pointwise layer is one ``[T, C] @ [C, C']`` GEMM.
* **Depthwise convs as multiply-adds** of three row slices: ORT's depthwise Conv cost as much
  as a 512x512 GEMM. Where a layer's taps reach into its context buffer, they are sliced from
  the buffer itself, so ``[buffer | input]`` is only built where a tap straddles both.
* **Encoder context per layer** (``enc0`` ... ``encN``, ``[2 * 2**i, C]`` each) instead of one
  ``[C, 510]`` tensor that every layer sliced and rewrote (the exporter turned each in-place
  slice update into a copy of the whole megabyte).
* **Grouped 1x1 projections** (one or two taps per channel) as broadcast multiply-adds; the
  label embedding (upstream always uses label 0) is a constant folded into ``proj_e2d_l``.
* **Attention**: the ``1/sqrt(head_dim)`` scale is folded into the query weights, the positional
  encoding into constant key/value offsets; each frame's keys and values are projected once and
  kept (``dec_kv``) for the next step's windows.
* **Output transposed conv** as one GEMM over ``out_buf_len + 1`` shifted row blocks.

State (:attr:`FastStep.state_names`): ``ctx`` (the last ``2L`` pre-net outputs, ``[1, 1, 2L]``,
absent without lookahead), ``prenet`` (the pre-net cache as the model lays it out, so the
priming graph is shared), ``enc0..``, ``dec_kv`` (``[layers, 2, ctx_len, 2 * dec_dim]``: each
layer's self- and cross-attention key/value projections of the last ``ctx_len`` frames) and ``out``
(``[out_buf_len, enc_dim]``). All zeros is the start of a stream.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .geometry import StreamGeometry
from .llvc import LLVC, GatedResidualBlock


def _const(t: Tensor) -> Tensor:
    return t.detach().clone().float().contiguous()


def _pairwise(conv: nn.Conv1d) -> tuple[Tensor, int, int]:
    """A grouped 1x1 conv's weight as ``[groups, out/g, in/g]``, with ``out/g`` and ``in/g``."""
    g = conv.groups
    w = conv.weight.detach()[..., 0]
    return w.reshape(g, conv.out_channels // g, conv.in_channels // g), conv.out_channels // g, conv.in_channels // g


class _Attention(nn.Module):
    """One ``nn.MultiheadAttention`` over windows, with queries pre-scaled and keys/values fused."""

    def __init__(self, mha: nn.MultiheadAttention, kv_offset: Tensor):
        super().__init__()
        d, h = mha.embed_dim, mha.num_heads
        self.heads, self.head_dim = h, d // h
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
        scale = 1.0 / math.sqrt(self.head_dim)
        self.register_buffer("wq", _const(w[:d].T * scale))
        self.register_buffer("bq", _const(b[:d] * scale))
        self.register_buffer("wkv", _const(w[d:].T))                          # [d, 2d]
        self.register_buffer("kv_add", _const(b[d:] + kv_offset @ w[d:].T))   # [W, 2d]
        self.register_buffer("wo", _const(mha.out_proj.weight.T))
        self.register_buffer("bo", _const(mha.out_proj.bias))

    def forward(self, q_in: Tensor, kv_windows: Tensor) -> Tensor:
        """``q_in`` ``[nW, chunk, d]`` attends to ``kv_windows`` ``[nW, W, 2d]`` (projected)."""
        nW, n, d = q_in.shape
        h, hd = self.heads, self.head_dim
        q = (q_in @ self.wq + self.bq).reshape(nW, n, h, hd).transpose(1, 2)       # [nW,h,n,hd]
        kv = kv_windows + self.kv_add
        W = kv.shape[1]
        k = kv[..., :d].reshape(nW, W, h, hd).permute(0, 2, 3, 1)                  # [nW,h,hd,W]
        v = kv[..., d:].reshape(nW, W, h, hd).transpose(1, 2)                      # [nW,h,W,hd]
        att = torch.softmax(q @ k, dim=-1) @ v                                     # [nW,h,n,hd]
        return att.transpose(1, 2).reshape(nW, n, d) @ self.wo + self.bo


class FastStep(nn.Module):
    """One exact streaming step of ``model`` at ``chunk_factor``, restructured (module docstring)."""

    def __init__(self, model: LLVC, chunk_factor: int):
        super().__init__()
        model = model.eval()
        self.geometry = StreamGeometry.of(model.cfg, chunk_factor)
        self.L = model.L
        self.chunk_len = self.geometry.chunk_len
        self.frames = self.chunk_len // self.L
        self.context_len = self.geometry.context_len
        self.taps = model.in_kernel // model.L
        self.perm = self._channel_order(model)
        with torch.no_grad():
            # Upstream always conditions on label 0: its embedding is a constant of the model.
            label = _const(model.label_vector(1, model.in_conv[0].weight.device)[0])
            self._init_prenet(model)
            self._init_encoder(model, label)
            self._init_decoder(model, label)
            self._init_output(model)
        self.state_names = (["ctx"] if self.context_len else []) + (["prenet"] if self.has_prenet else []) \
            + [f"enc{i}" for i in range(len(self.enc_lengths))] + ["dec_kv", "out"]

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _channel_order(model: LLVC) -> Tensor:
        """The order of the encoder's channels in this step: new position -> model channel.

        The grouped projections pair channels ``(2g, 2g + 1)``. Kept parity-major (all even
        channels, then all odd ones), both projections become multiply-adds over contiguous
        ``[2, groups]`` blocks instead of strided pairs. LayerNorm does not care about channel
        order; every other per-channel weight is permuted alike, and so are the encoder and
        output buffers.
        """
        order = torch.arange(model.enc_dim, device=model.in_conv[0].weight.device)
        return order.reshape(-1, 2).T.reshape(-1) if model.mask_gen.proj and model.enc_dim % 2 == 0 else order

    def _init_prenet(self, model: LLVC) -> None:
        self.has_prenet = model.has_prenet
        if not self.has_prenet:
            return
        net = model.convnet_pre
        if net.ctx_height != 1:  # wider caches keep rows a layer does not rewrite
            raise ValueError("FastStep supports pre-nets with one channel")
        self.prenet_net = net  # module calls for block types without a fused form
        self.prenet_shape = tuple(net.init_ctx(1).shape)
        self.prenet_combine = net.combine
        self.prenet_skip = model.cfg.convnet_config.skip_connection
        self.prenet_fused = []
        for i, layer in enumerate(net.down_convs):
            fused = (isinstance(layer, GatedResidualBlock) and layer.filter.in_channels == 1
                     and layer.filter.out_channels == 1)
            self.prenet_fused.append(fused)
            if fused:  # filter and gate as one conv with two output channels
                self.register_buffer(f"pre_w{i}", _const(torch.cat((layer.filter.weight, layer.gate.weight))))
                self.register_buffer(f"pre_b{i}", _const(torch.cat((layer.filter.bias, layer.gate.bias))))

    def _init_encoder(self, model: LLVC, label: Tensor) -> None:
        P = self.perm
        self.register_buffer("w_in", _const(model.in_conv[0].weight.reshape(model.enc_dim, -1).T[:, P]))
        enc = model.mask_gen.encoder
        self.enc_lengths = list(enc.buf_lengths)
        self.enc_dilations, self.enc_ln = [], []
        for i, layer in enumerate(enc.dcc_layers):
            dw, ln1, _, pw, ln2, _ = layer.layers
            self.enc_dilations.append(dw.dilation[0])
            self.register_buffer(f"dw_w{i}", _const(dw.weight[:, 0, :].T[:, P]))   # [k, C]
            self.register_buffer(f"dw_b{i}", _const(dw.bias[P]))
            self.register_buffer(f"pw_w{i}", _const(pw.weight[..., 0].T[P][:, P]))  # [C, C]
            self.register_buffer(f"pw_b{i}", _const(pw.bias[P]))
            for j, ln in ((1, ln1), (2, ln2)):
                self.register_buffer(f"ln{j}_w{i}", _const(ln.weight[P]))
                self.register_buffer(f"ln{j}_b{i}", _const(ln.bias[P]))
            self.enc_ln.append(ln1.eps)
        self.register_buffer("label", label[P].clone())

    def _init_decoder(self, model: LLVC, label: Tensor) -> None:
        mg = model.mask_gen
        self.proj, self.skip = mg.proj, mg.skip_connection
        dec = mg.decoder
        self.dec_dim, self.ctx_len, self.chunk = dec.dim, dec.ctx_len, dec.chunk
        self.windows = self.frames // self.chunk
        if self.proj:
            # In the parity-major channel order (_channel_order) the encoder output reshapes to
            # [T, parity, G]: e -> [proj_e2d_e(e), proj_e2d_l(label * e)] is one multiply-add
            # with weights [projection, parity, G], and proj_d2e one with weights [parity, G].
            we, oe, ie = _pairwise(mg.proj_e2d_e[0])
            wl, ol, il = _pairwise(mg.proj_e2d_l[0])
            wd, od, idd = _pairwise(mg.proj_d2e[0])
            if (oe, ie, ol, il, od, idd) != (1, 2, 1, 2, 2, 1) or model.enc_dim != 2 * we.shape[0]:
                raise ValueError("FastStep needs grouped projections pairing encoder channels")
            pairs = label.reshape(-1, 2)
            self.register_buffer("w_e2d", _const(torch.stack((we[:, 0, :].T, (wl[:, 0, :] * pairs).T))))
            self.register_buffer("b_e2d", _const(torch.stack((mg.proj_e2d_e[0].bias, mg.proj_e2d_l[0].bias))))
            self.register_buffer("w_d2e", _const(wd[:, :, 0].T))                       # [2, G]
            self.register_buffer("b_d2e", _const(mg.proj_d2e[0].bias[self.perm].reshape(2, -1)))
        pe = dec.pos_enc.pe[0, : self.ctx_len + self.chunk] if dec.use_pos_enc else None
        zeros = dec.pos_enc.pe.new_zeros(self.ctx_len + self.chunk, self.dec_dim)
        # Layer 0's query rows carry the positional encoding into its residual too.
        self.query_pe = pe is not None
        if self.query_pe:
            self.register_buffer("pe_q", _const(pe[self.ctx_len:]))
        self.self_att, self.cross_att, self.dec_norms = nn.ModuleList(), nn.ModuleList(), []
        for i, layer in enumerate(dec.tf_dec_layers):
            first = i == 0 and pe is not None
            self.self_att.append(_Attention(layer.self_attn, pe if first else zeros))
            self.cross_att.append(_Attention(layer.multihead_attn, pe if pe is not None else zeros))
            for j, norm in enumerate((layer.norm1, layer.norm2, layer.norm3)):
                self.register_buffer(f"dn{j}_w{i}", _const(norm.weight))
                self.register_buffer(f"dn{j}_b{i}", _const(norm.bias))
            self.dec_norms.append(layer.norm1.eps)
            self.register_buffer(f"ff1_w{i}", _const(layer.linear1.weight.T))
            self.register_buffer(f"ff1_b{i}", _const(layer.linear1.bias))
            self.register_buffer(f"ff2_w{i}", _const(layer.linear2.weight.T))
            self.register_buffer(f"ff2_b{i}", _const(layer.linear2.bias))
        self.dec_layers = len(dec.tf_dec_layers)

    def _init_output(self, model: LLVC) -> None:
        self.out_len = model.out_buf_len
        w = model.out_conv[0].weight[self.perm, 0, :]                              # [C, (B+1)L]
        hops = w.reshape(w.shape[0], self.out_len + 1, self.L).permute(1, 0, 2)     # [B+1, C, L]
        self.register_buffer("w_out", _const(hops.reshape(-1, self.L)))            # [(B+1)C, L]

    # ------------------------------------------------------------------ state
    def initial_state(self) -> list[Tensor]:
        """Zeroed state tensors in :attr:`state_names` order."""
        shapes = ([(1, 1, self.context_len)] if self.context_len else []) \
            + ([self.prenet_shape] if self.has_prenet else []) \
            + [(n, self.w_in.shape[1]) for n in self.enc_lengths] \
            + [(self.dec_layers, 2, self.ctx_len, 2 * self.dec_dim), (self.out_len, self.w_in.shape[1])]
        return [torch.zeros(s) for s in shapes]

    # ------------------------------------------------------------------ the step
    def forward(self, chunk: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """One stream: ``chunk`` ``[chunk_len]`` and its state -> ``(audio, *new_state)``.

        Also ``B`` streams at once: ``chunk`` ``[B, chunk_len]`` and every state tensor with a
        leading ``[B]`` (``models/batch.py``). The code indexes time and channels from the end,
        so one stream runs exactly the ops it always did (the exported graph is unchanged: a
        leading batch of one cost ONNX Runtime 30-40 % per step), and no op mixes streams.
        """
        st = dict(zip(self.state_names, state))
        new: dict[str, Tensor] = {}
        lead = tuple(chunk.shape[:-1])  # () for one stream, (B,) for a batch
        x = chunk.reshape(-1, 1, self.chunk_len)
        if self.has_prenet:
            x, cache = self._prenet(x, st["prenet"].reshape(-1, *self.prenet_shape[1:]) if lead else st["prenet"])
            new["prenet"] = cache.reshape(*lead, *self.prenet_shape) if lead else cache
        ctx = st["ctx"].reshape(-1, 1, self.context_len) if lead and self.context_len else st.get("ctx")
        full = torch.cat((ctx, x), dim=-1) if self.context_len else x
        if self.context_len:
            new["ctx"] = full[..., self.chunk_len:].reshape(*lead, 1, 1, self.context_len) if lead \
                else full[..., self.chunk_len:]
        frames = self._in_conv(full.reshape(*lead, -1))
        e = frames
        for i in range(len(self.enc_lengths)):
            e, new[f"enc{i}"] = self._encoder_layer(i, e, st[f"enc{i}"])
        labeled = e * self.label
        if self.proj:
            both = torch.relu((e.reshape(*lead, self.frames, 1, 2, -1) * self.w_e2d).sum(-2) + self.b_e2d)
            mem, tgt = both[..., 0, :], both[..., 1, :]
        else:
            mem, tgt = e, labeled
        dec, new["dec_kv"] = self._decoder(tgt, mem, st["dec_kv"])
        if self.proj:
            m = torch.relu(dec.unsqueeze(-2) * self.w_d2e + self.b_d2e).reshape(*lead, self.frames, -1)
        else:
            m = dec
        mask = labeled + m if self.skip else m
        audio, new["out"] = self._out_conv(frames * mask, st["out"])
        return (audio, *(new[k] for k in self.state_names))

    def _prenet(self, x: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        net, inp = self.prenet_net, x
        pieces = []
        for i, layer in enumerate(net.down_convs):
            lo, n = net.buf_starts[i], net.buf_lengths[i]
            rows = x.shape[1]
            conv_in = torch.cat((cache[:, :rows, lo:lo + n], x), dim=-1) if n else x
            if n:
                pieces.append(conv_in[..., -n:])
            if self.prenet_fused[i]:
                y = F.conv1d(conv_in, getattr(self, f"pre_w{i}"), getattr(self, f"pre_b{i}"),
                             dilation=layer.filter.dilation[0])
                # conv_in[..., crop:] is x itself (a layer's cache is its crop): no slice needed.
                out = x + torch.tanh(y[:, :1]) * torch.sigmoid(y[:, 1:])
            else:
                out = layer(conv_in)
            x = x + out if self.prenet_combine == "add" else x * out if self.prenet_combine == "multiply" else out
        new_cache = torch.cat(pieces, dim=-1) if pieces else cache
        skip = self.prenet_skip
        y = inp + x if skip == "add" else inp * x if skip == "multiply" else x
        return y, new_cache

    def _in_conv(self, full: Tensor) -> Tensor:
        """``in_conv`` (kernel ``taps * L``, stride ``L``) as one ``[T, taps*L] @ [taps*L, C]`` GEMM."""
        T, k = self.frames, self.taps
        hops = full.reshape(*full.shape[:-1], T + k - 1, self.L)
        patches = torch.cat([hops[..., j:j + T, :] for j in range(k)], dim=-1) if k > 1 else hops
        return torch.relu(patches @ self.w_in)

    def _encoder_layer(self, i: int, x: Tensor, buf: Tensor) -> tuple[Tensor, Tensor]:
        T, n, d = self.frames, self.enc_lengths[i], self.enc_dilations[i]

        def rows(a: int, b: int) -> Tensor:
            """Rows ``[a, b)`` of ``[buf | x]`` without building it where one side suffices."""
            if b <= n:
                return buf[..., a:b, :]
            if a >= n:
                return x[..., a - n:b - n, :]
            return torch.cat((buf[..., a:, :], x[..., :b - n, :]), dim=-2)

        w = getattr(self, f"dw_w{i}")
        taps = w.shape[0]
        h = getattr(self, f"dw_b{i}") + rows(0, T) * w[0]
        for k in range(1, taps):
            h = h + rows(k * d, k * d + T) * w[k]
        eps = self.enc_ln[i]
        h = torch.relu(F.layer_norm(h, h.shape[-1:], getattr(self, f"ln1_w{i}"), getattr(self, f"ln1_b{i}"), eps))
        h = h @ getattr(self, f"pw_w{i}") + getattr(self, f"pw_b{i}")
        h = torch.relu(F.layer_norm(h, h.shape[-1:], getattr(self, f"ln2_w{i}"), getattr(self, f"ln2_b{i}"), eps))
        return x + h, rows(T, T + n)

    def _windows(self, seq: Tensor) -> Tensor:
        """``[ctx_len + T, D]`` → ``[nW, ctx_len + chunk, D]`` overlapping decoder windows
        (``[B, ctx_len + T, D]`` → ``[B * nW, ctx_len + chunk, D]`` for a batch)."""
        W = self.ctx_len + self.chunk
        if seq.dim() == 3:
            return seq if self.windows == 1 else torch.stack(
                [seq[:, w * self.chunk:w * self.chunk + W] for w in range(self.windows)], dim=1).flatten(0, 1)
        if self.windows == 1:
            return seq.unsqueeze(0)
        return torch.stack([seq[w * self.chunk:w * self.chunk + W] for w in range(self.windows)])

    def _decoder(self, tgt: Tensor, mem: Tensor, kv_ctx: Tensor) -> tuple[Tensor, Tensor]:
        """The windowed decoder; ``kv_ctx [layers, 2, ctx_len, 2D]`` holds each layer's key/value
        projections (self, cross) of the last ``ctx_len`` frames, so each frame is projected once."""
        lead, nW, n, D = tuple(tgt.shape[:-2]), self.windows, self.chunk, self.dec_dim
        new_ctx = []
        x = tgt
        for i in range(self.dec_layers):
            att_s, att_c = self.self_att[i], self.cross_att[i]
            self_kv = torch.cat((kv_ctx[..., i, 0, :, :], x @ att_s.wkv), dim=-2)
            cross_kv = torch.cat((kv_ctx[..., i, 1, :, :], mem @ att_c.wkv), dim=-2)
            new_ctx.append(torch.stack((self_kv[..., -self.ctx_len:, :], cross_kv[..., -self.ctx_len:, :]), dim=-3))
            q_in = x.reshape(-1, n, D)  # every window of every stream: [B * nW, n, D]
            if i == 0 and self.query_pe:
                q_in = q_in + self.pe_q
            eps = self.dec_norms[i]
            h = F.layer_norm(q_in + att_s(q_in, self._windows(self_kv)), (D,),
                             getattr(self, f"dn0_w{i}"), getattr(self, f"dn0_b{i}"), eps)
            h = F.layer_norm(h + att_c(h, self._windows(cross_kv)), (D,),
                             getattr(self, f"dn1_w{i}"), getattr(self, f"dn1_b{i}"), eps)
            ff = torch.relu(h @ getattr(self, f"ff1_w{i}") + getattr(self, f"ff1_b{i}"))
            ff = ff @ getattr(self, f"ff2_w{i}") + getattr(self, f"ff2_b{i}")
            h = F.layer_norm(h + ff, (D,), getattr(self, f"dn2_w{i}"), getattr(self, f"dn2_b{i}"), eps)
            x = h.reshape(*lead, nW * n, D)
        return x, torch.stack(new_ctx, dim=-4)

    def _out_conv(self, masked: Tensor, buf: Tensor) -> tuple[Tensor, Tensor]:
        """Transposed conv (kernel ``(B+1)L``, stride ``L``, padding ``BL``) + tanh, time-major.

        Output frame ``u`` is ``sum_j z[u + B - j] @ K_j`` with ``z = [buffer | masked]`` and
        ``K_j`` the kernel's ``j``-th hop: one GEMM of the ``B + 1`` shifted row blocks side by
        side with the hops stacked (``w_out``).
        """
        T, B = self.frames, self.out_len
        z = torch.cat((buf, masked), dim=-2) if B else masked
        shifted = torch.cat([z[..., B - j:B - j + T, :] for j in range(B + 1)], dim=-1) if B else z
        return torch.tanh(shifted @ self.w_out).reshape(*masked.shape[:-2], self.chunk_len), z[..., T:, :]
