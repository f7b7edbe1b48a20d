"""Kernel bodies shared by the CUDA and Metal backends.

Each body is written once against a handful of portability macros (``TQ_SHARED``,
``TQ_BARRIER``, ``tq_warp_sum``, ...) that ``cuda.py`` and ``metal.py`` define in their
headers, so both backends run the same algorithm with the same structure: a Metal
simdgroup of 32 threads plays the role of a CUDA warp of 32. A backend prepends a
two-line prelude that names its thread/block indices (mlx declares the Metal built-ins a
body mentions by scanning its text, so those names must appear in the body itself).

Storage layout read and written here is the one of ``codec/packing.py``: code ``j`` of a
vector sits at bits ``[j * BITS, (j + 1) * BITS)`` of a little-endian stream of uint32
words, so with 3 bits a code may straddle two words. Every kernel requires D % 32 == 0,
which makes each group of 32 coordinates start on a word boundary.
"""

# Inside a block that has the query's shared array q_sh [D][R]: load the query (scaled when
# PREP_Q), run the includer's code on the query in the model's basis (`{after_load}`), then
# rotate it in place into the keys' basis by the dense matrix rot (ROTATE_Q). The portable
# kernel's; it defines PREP_Q and ROTATE_Q. (The tensor-core kernel loads its query itself,
# into registers first, so that its other requests go out before anything waits.)
_PREPARE_QUERY = r"""
    // q is [B * H_kv, R, D]: raw queries (PREP_Q) or already scaled and rotated float32.
    const float scale = PREP_Q ? tq_as_float(SCALE_BITS) : 1.0f;
    for (int i = tq_tid; i < D * R; i += NT) {
      const int r = i / D;
      q_sh[(i - r * D) * R + r] = static_cast<float>(q[(int64_t)bh * R * D + i]) * scale;
    }
{after_load}
    if (ROTATE_Q) {
      // Rotate in place: one rotation column per thread, all rows at once, so each matrix
      // element is loaded once per block and the loads are independent (no latency chain).
      constexpr int EPT = (D + NT - 1) / NT;
      float qr[EPT * R];
      TQ_UNROLL for (int i = 0; i < EPT * R; ++i) {
        qr[i] = 0.0f;
      }
      TQ_BARRIER();
      TQ_UNROLL32 for (int j = 0; j < D; ++j) {
        TQ_UNROLL for (int k = 0; k < EPT; ++k) {
          const int e = tq_tid + k * NT;
          const float m = e < D ? rot[j * D + e] : 0.0f;
          TQ_UNROLL for (int r = 0; r < R; ++r) {
            qr[k * R + r] += q_sh[j * R + r] * m;
          }
        }
      }
      TQ_BARRIER();
      TQ_UNROLL for (int k = 0; k < EPT; ++k) {
        const int e = tq_tid + k * NT;
        if (e < D) {
          TQ_UNROLL for (int r = 0; r < R; ++r) {
            q_sh[e * R + r] = qr[k * R + r];
          }
        }
      }
    }
"""


def _prepare_query(after_load: str = "") -> str:
    return _PREPARE_QUERY.replace("{after_load}", after_load)


# Which tokens a block of either attention kernel reads: its (batch, KV head) bh and its
# span [t_begin, t_end) of the T tokens, from pos = [T] and meta = [capacity, span,
# n_splits, n_kv_heads]. Where a token's data lives: four arrays (keys of WK words,
# key_norms, values of WV words, value_norms), or with PACKED one row of PROW words per
# token, passed as both `keys` and `values`: key codes, value codes, then one word holding
# both fp16 norms (the key's in the low half). One row means one slice update per step.
_BLOCK_SPAN = r"""
  const int T = pos[0];
  const int cap = meta[0];
  const int span = meta[1];
  const int n_splits = meta[2];
  const int n_kv_heads = meta[3];
  const int split = tq_bx;
  const int bh = tq_by;
  const int b = bh / n_kv_heads;
  const int kvh = bh - b * n_kv_heads;
  const int t_begin = split * span;
  const int t_end = t_begin + span < T ? t_begin + span : T;
  const int64_t tok0 = (int64_t)bh * cap;
  constexpr int PROW = WK + WV + 1;
"""


def _key_norm(tok):
    return (f"(PACKED ? tq_half_bits(keys[({tok}) * PROW + WK + WV] & 0xFFFFu) "
            f": TQ_HALF_TO_FLOAT(key_norms[{tok}]))")  # fmt: skip


def _value_norm(tok):
    return (f"(PACKED ? tq_half_bits(values[({tok}) * PROW + WK + WV] >> 16) "
            f": TQ_HALF_TO_FLOAT(value_norms[{tok}]))")  # fmt: skip


def _key_word(tok, i):  # word i of the keys of tokens tok, tok + 1, ... read as one stream
    return f"(PACKED ? keys[({tok} + ({i}) / WK) * PROW + ({i}) % WK] : keys[({tok}) * WK + {i}])"


def _value_word(tok, i):
    return (f"(PACKED ? values[({tok} + ({i}) / WV) * PROW + WK + ({i}) % WV] "
            f": values[({tok}) * WV + {i}])")  # fmt: skip


# One warp's fast Walsh-Hadamard transform of a row of D coordinates, lane holding
# coordinates lane + 32 k in v[k] (k < EPL = D / 32): v <- v H with H[i][j] =
# (-1)^popcount(i & j). Distances below 32 pair lanes (shuffles), the others pair a lane's
# own registers; no barrier, no shared memory.
_WARP_WALSH_HADAMARD = r"""
      TQ_UNROLL for (int h = 1; h < 32; h <<= 1) {
        const bool upper = (lane & h) != 0;
        TQ_UNROLL for (int k = 0; k < EPL; ++k) {
          const float o = tq_shfl_xor(v[k], h);
          v[k] = upper ? o - v[k] : v[k] + o;
        }
      }
      TQ_UNROLL for (int h = 1; h < EPL; h <<= 1) {
        TQ_UNROLL for (int k = 0; k < EPL; ++k) {
          if ((k & h) == 0) {
            const float a = v[k], b = v[k + h];
            v[k] = a + b;
            v[k + h] = a - b;
          }
        }
      }
"""


# A centred cache (CENTRED; codec/centring.py) stores k_t - R_t mu: each score gets
# q . R_t mu back. Per RoPE pair j (channels ca, cb; RDIMS channels turn, NP = RDIMS / 2
# pairs) that is Re(Z_j e^{i t w_j}) with Z_j = conj(q_j) mu_j, plus the constant
# q . mu over the channels that do not turn (c0). kmean is [B * H_kv, D] (mu per KV head),
# omega [NP] (w_j, radians per position). Both kernels write t = t0 + u for a step t0 of
# the tokens: Y_j = Z_j e^{i t0 w_j} once per step and row, then a table of e^{i u w_j}.
_CENTRE_PAIRS = r"""
        const int ca = RTRAD ? 2 * j : j;
        const int cb = RTRAD ? 2 * j + 1 : j + NP;
        const float qa = q_sh[(ca * R + r) % QSZ], qb = q_sh[(cb * R + r) % QSZ];
        const float ma = kmean[(int64_t)bh * D + ca], mb = kmean[(int64_t)bh * D + cb];
        const float zr = qa * ma + qb * mb;
        const float zi = qa * mb - qb * ma;
"""

def _complex_product(re: str, im: str, a, b, indent: int) -> str:
    """C statements ``re = Re(a b)``, ``im = Im(a b)`` for a = (ar, ai), b = (br, bi) given
    as C expressions: the one spelling of the turns both kernels apply (``re`` and ``im``
    may be declarations)."""
    (ar, ai), (br, bi), pad = a, b, " " * indent
    return (f"\n{pad}{re} = {ar} * {br} - {ai} * {bi};"
            f"\n{pad}{im} = {ar} * {bi} + {ai} * {br};")


def _turn_table(step: str) -> str:
    """Fill dstep_sh [pair][re, im] with e^{i step w_j}: what turns Y from one step of the
    tokens to the next (``step`` a C expression)."""
    return r"""
      for (int j = tq_tid; j < NP; j += NT) {
        const float a = (float)(""" + step + r""") * omega[j];
        dstep_sh[2 * j] = tq_cos(a);
        dstep_sh[2 * j + 1] = tq_sin(a);
      }"""


# The portable kernel's centring set-up, on the query in the model's basis: Y = Z e^{i t w}
# [pair][row] at the span's first token, c0 [row], the turn of Y from one tile to the next,
# and the tables e^{i u w} for u = 8 a + f as a coarse [pair][a] and a fine [pair][f]
# factor (TILE x NP entries would not fit in shared memory).
_CENTRE_PORTABLE = r"""
    if (CENTRED) {
      TQ_BARRIER();
      for (int i = tq_tid; i < NP * R; i += NT) {
        const int j = i / R;
        const int r = i - j * R;""" + _CENTRE_PAIRS + r"""
        const float a = (float)t_begin * omega[j];
        const float cs = tq_cos(a), sn = tq_sin(a);""" + _complex_product(
    "yc_sh[2 * i]", "yc_sh[2 * i + 1]", ("zr", "zi"), ("cs", "sn"), 8) + r"""
      }""" + _turn_table("TILE") + r"""
      for (int r = tq_tid; r < R; r += NT) {
        float c0 = 0.0f;
        for (int d = RDIMS; d < D; ++d) {
          c0 += q_sh[(d * R + r) % QSZ] * kmean[(int64_t)bh * D + d];
        }
        c0_sh[r] = c0;
      }
      for (int i = tq_tid; i < NP * 8; i += NT) {
        const float a = (float)(i & 7) * omega[i >> 3];
        wf_sh[2 * i] = tq_cos(a);
        wf_sh[2 * i + 1] = tq_sin(a);
      }
      for (int i = tq_tid; i < NP * NCT; i += NT) {
        const int j = i / NCT;
        const float a = (float)(8 * (i - j * NCT)) * omega[j];
        wc_sh[2 * i] = tq_cos(a);
        wc_sh[2 * i + 1] = tq_sin(a);
      }
    }
"""

# Decode attention, pass 1 (flash-decoding). One block per (batch * KV head, token span):
# the R = n_rep * L query rows of that KV head share each read of its packed keys and
# values (GQA). Tiles of TILE tokens are staged in shared memory with coalesced loads;
# scores are computed one thread per token (the query sits in shared memory, or is read
# through the cache when too large), then an online softmax per row, then the values:
# each lane owns VCPL = D / 32 adjacent coordinates and the warps take turns over the
# tokens (VSPLIT: every warp holds every row) or own a share of the rows (all tokens).
# Writes unnormalized partial outputs and their (max, sum) for the reduce pass.
#
# Shared memory is the limit on speed here, not arithmetic: the centroid tables of keys
# (up to 16 entries) and values are replicated once per lane (entry c of lane l at
# c * 32 + l), so the random lookups of a warp never hit the same bank twice.
#
# Templates: D, R, L, NREP, NT (threads), TILE (tokens per tile <= NT), KBITS (2/3/4/8, or
# 16 for float keys with KEY_BF16 choosing the format), WK / WV (words per vector), VBITS,
# VSPLIT, RW (rows per warp in the value phase), Q_SH (query in shared memory), PREP_Q (the
# block scales and rotates the raw query itself, saving the launches of a separate pass;
# needs Q_SH), SCALE_BITS (the float32 bits of the scale), QT (the query dtype), MASK_MODE
# (0 none, 1 causal, 2 additive array [MB?B:1, MH?H_q:1, ML?L:1, T]), CENTRED, RDIMS and
# RTRAD (the RoPE layout: adjacent pairs) for a centred cache (needs Q_SH).
# pos = [T] (kept on the device between steps); meta = [capacity, span, n_splits,
# n_kv_heads] (constant until the cache grows). rot is the key rotation's matrix [D, D]
# (unused for float keys). Shared rows that are read four at a time (query, weights) are
# float4 arrays when R % 4 == 0.
ATTENTION = r"""
  constexpr int NWARPS = NT / 32;
  constexpr int WPC = KBITS < 16 ? KBITS : 16;  // words per 32 key coordinates
  constexpr int KMASK = KBITS < 16 ? (1 << KBITS) - 1 : 0xFFFF;
  constexpr int VMASK = (1 << VBITS) - 1;
  constexpr int NKC = KBITS < 16 ? (1 << KBITS) : 1;
  constexpr int KREP = NKC <= 16 ? 32 : 1;  // per-lane copies of the key centroids
  constexpr int KSTRIDE = WK | 1;  // odd row stride: one thread per token, no bank conflicts
  constexpr int QSZ = Q_SH ? D * R : 4;
  constexpr bool VEC4 = R % 4 == 0;
  constexpr int VCPL = D / 32;  // value coordinates per lane
  constexpr int VFIELD = VCPL * VBITS;  // bits of one lane's codes in a value row (<= 32)
  constexpr float NEG = -1e30f;  // a masked score, as in the reference path

  TQ_SHARED float4 q_sh4[QSZ / 4];  // [D][R]; reused for the warps' outputs at the end
  TQ_SHARED uint32_t k_sh[TILE * KSTRIDE];
  TQ_SHARED uint32_t v_sh[TILE * WV + 1];  // + 1: a lane's field may end in the last word
  TQ_SHARED float4 p_sh4[(R * TILE + 3) / 4];  // [token][R]: scores, then p * value_norm
  TQ_SHARED_PTR(float) q_sh = (TQ_SHARED_PTR(float))q_sh4;
  TQ_SHARED_PTR(float) p_sh = (TQ_SHARED_PTR(float))p_sh4;
  TQ_SHARED float kc_sh[NKC * KREP];
  TQ_SHARED float vc_sh[(1 << VBITS) * 32];
  TQ_SHARED float m_sh[R];
  TQ_SHARED float l_sh[R];
  TQ_SHARED float a_sh[R];
  // Centring: this tile's Y [pair][row][re, im], the tile-to-tile turn [pair][re, im],
  // tables [pair][a or f][cos, sin], c0.
  constexpr int NP = CENTRED ? RDIMS / 2 : 1;
  constexpr int NCT = TILE / 8;
  TQ_SHARED float yc_sh[CENTRED ? 2 * NP * R : 1];
  TQ_SHARED float dstep_sh[CENTRED ? 2 * NP : 1];
  TQ_SHARED float wf_sh[CENTRED ? 2 * NP * 8 : 1];
  TQ_SHARED float wc_sh[CENTRED ? 2 * NP * NCT : 1];
  TQ_SHARED float c0_sh[R];

  const int lane = tq_tid & 31;
  const int warp = tq_tid >> 5;
""" + _BLOCK_SPAN + r"""
  if (Q_SH) {
    constexpr bool ROTATE_Q = PREP_Q && KBITS < 16;""" + _prepare_query(_CENTRE_PORTABLE) + r"""  }
  for (int i = tq_tid; i < NKC * KREP; i += NT) {
    kc_sh[i] = kcent[i / KREP];
  }
  for (int i = tq_tid; i < (1 << VBITS) * 32; i += NT) {
    vc_sh[i] = vcent[i / 32];
  }
  if (tq_tid < R) {
    m_sh[tq_tid] = -TQ_INF;
    l_sh[tq_tid] = 0.0f;
  }
  if (tq_tid == 0) {
    v_sh[TILE * WV] = 0u;
  }

  // Value phase: this lane's codes start at bit vbit0 of a row; rows vrow(i) of acc.
  const int vbit0 = lane * VFIELD;
  const int vw0 = vbit0 >> 5;
  const int vsh0 = vbit0 & 31;
  float acc[RW * VCPL];
  TQ_UNROLL for (int i = 0; i < RW * VCPL; ++i) {
    acc[i] = 0.0f;
  }

  // The next tile's packed words wait in registers while this tile is computed, so the
  // memory latency overlaps the arithmetic (same scheme on both backends, no async copies).
  constexpr int PK = (TILE * WK + NT - 1) / NT;
  constexpr int PV = (TILE * WV + NT - 1) / NT;
  uint32_t pk[PK];
  uint32_t pv[PV];
  {
    const int n0 = t_end - t_begin < TILE ? t_end - t_begin : TILE;
    TQ_UNROLL for (int u = 0; u < PK; ++u) {
      const int i = tq_tid + u * NT;
      pk[u] = i < n0 * WK ? """ + _key_word("tok0 + t_begin", "i") + r""" : 0u;
    }
    TQ_UNROLL for (int u = 0; u < PV; ++u) {
      const int i = tq_tid + u * NT;
      pv[u] = i < n0 * WV ? """ + _value_word("tok0 + t_begin", "i") + r""" : 0u;
    }
  }

  for (int t0 = t_begin; t0 < t_end; t0 += TILE) {
    const int n = t_end - t0 < TILE ? t_end - t0 : TILE;
    TQ_BARRIER();  // the previous tile's readers are done
    TQ_UNROLL for (int u = 0; u < PK; ++u) {
      const int i = tq_tid + u * NT;
      if (i < n * WK) {
        const int tt = i / WK;
        k_sh[tt * KSTRIDE + (i - tt * WK)] = pk[u];
      }
    }
    TQ_UNROLL for (int u = 0; u < PV; ++u) {
      const int i = tq_tid + u * NT;
      if (i < n * WV) {
        v_sh[i] = pv[u];
      }
    }
    const int t1 = t0 + TILE;
    if (t1 < t_end) {
      const int n1 = t_end - t1 < TILE ? t_end - t1 : TILE;
      TQ_UNROLL for (int u = 0; u < PK; ++u) {
        const int i = tq_tid + u * NT;
        pk[u] = i < n1 * WK ? """ + _key_word("tok0 + t1", "i") + r""" : 0u;
      }
      TQ_UNROLL for (int u = 0; u < PV; ++u) {
        const int i = tq_tid + u * NT;
        pv[u] = i < n1 * WV ? """ + _value_word("tok0 + t1", "i") + r""" : 0u;
      }
    }
    if (CENTRED && t0 != t_begin) {  // Y turns to this tile's first token
      for (int i = tq_tid; i < NP * R; i += NT) {
        const int j = i / R;
        const float dr = dstep_sh[2 * j], di = dstep_sh[2 * j + 1];
        const float yr = yc_sh[2 * i], yi = yc_sh[2 * i + 1];""" + _complex_product(
    "yc_sh[2 * i]", "yc_sh[2 * i + 1]", ("yr", "yi"), ("dr", "di"), 8) + r"""
      }
    }
    TQ_BARRIER();

    // Scores, one thread per token: the query is already scaled and rotated, so each
    // key coordinate is a centroid looked up by its code.
    if (tq_tid < TILE) {
      const int tt = tq_tid;
      const int t = t0 + tt;
      const int krep = KREP > 1 ? lane : 0;
      float s[R];
      float sc[R];  // q . R_t mu (centred caches)
      TQ_UNROLL for (int r = 0; r < R; ++r) {
        s[r] = 0.0f;
        sc[r] = CENTRED ? c0_sh[r] : 0.0f;
      }
      if (tt < n) {
        // Not unrolled over chunks: 32 * R unrolled FMAs per chunk keep compile time low.
        for (int c = 0; c < D / 32; ++c) {
          uint32_t wr[WPC];
          TQ_UNROLL for (int w = 0; w < WPC; ++w) {
            wr[w] = k_sh[tt * KSTRIDE + c * WPC + w];
          }
          TQ_UNROLL for (int jj = 0; jj < 32; ++jj) {
            float kv;
            if (KBITS >= 16) {
              const uint32_t h = (wr[(jj >> 1) % WPC] >> ((jj & 1) * 16)) & 0xFFFFu;
              kv = KEY_BF16 ? tq_bf16_bits(h) : tq_half_bits(h);
            } else {
              const int bit = jj * KBITS;
              const int sh = bit & 31;
              uint32_t code = wr[(bit >> 5) % WPC] >> sh;
              if (sh + KBITS > 32) {
                code |= wr[((bit >> 5) + 1) % WPC] << (32 - sh);
              }
              kv = kc_sh[((code & KMASK) % NKC) * KREP + krep];
            }
            const int j = c * 32 + jj;
            if (VEC4 && Q_SH) {
              TQ_UNROLL for (int r4 = 0; r4 < R / 4; ++r4) {
                const float4 qv = q_sh4[((j * R) / 4 + r4) % (QSZ / 4)];
                s[4 * r4] += qv.x * kv;
                s[(4 * r4 + 1) % R] += qv.y * kv;
                s[(4 * r4 + 2) % R] += qv.z * kv;
                s[(4 * r4 + 3) % R] += qv.w * kv;
              }
            } else {
              TQ_UNROLL for (int r = 0; r < R; ++r) {
                const float qv = Q_SH ? q_sh[(j * R + r) % QSZ]
                                      : static_cast<float>(q[((int64_t)bh * R + r) * D + j]);
                s[r] += qv * kv;
              }
            }
          }
        }
        if (CENTRED) {  // sum_j Re(Y_j e^{i tt w_j}), e^{i tt w} = coarse x fine factor
          const int a = tt >> 3;
          const int f = tt & 7;
          for (int j = 0; j < NP; ++j) {
            const float fr = wf_sh[(j * 8 + f) * 2], fi = wf_sh[(j * 8 + f) * 2 + 1];
            const float cr = wc_sh[(j * NCT + a) * 2], ci = wc_sh[(j * NCT + a) * 2 + 1];""" + \
    _complex_product("const float er", "const float ei", ("cr", "ci"), ("fr", "fi"), 12) + r"""
            TQ_UNROLL for (int r = 0; r < R; ++r) {
              sc[r] += yc_sh[(j * R + r) * 2] * er - yc_sh[(j * R + r) * 2 + 1] * ei;
            }
          }
        }
      }
      const float kn = (KBITS < 16 && tt < n) ? """ + _key_norm("tok0 + t") + r""" : 1.0f;
      TQ_UNROLL for (int r = 0; r < R; ++r) {
        float v = s[r] * kn + sc[r];
        if (MASK_MODE == 1 && t > T - L + r % L) {
          v = NEG;
        }
        if (MASK_MODE == 2 && tt < n) {
          const int mb = MB ? b : 0;
          const int mh = MH ? kvh * NREP + r / L : 0;
          const int ml = ML ? r % L : 0;
          const int mh_n = MH ? n_kv_heads * NREP : 1;
          const int ml_n = ML ? L : 1;
          v += mask[(((int64_t)mb * mh_n + mh) * ml_n + ml) * T + t];
        }
        p_sh[tt * R + r] = tt < n ? v : -TQ_INF;
      }
    }
    TQ_BARRIER();

    // Online softmax, one warp per row.
    for (int r = warp; r < R; r += NWARPS) {
      float mx = -TQ_INF;
      for (int i = lane; i < TILE; i += 32) {
        mx = tq_max(mx, p_sh[i * R + r]);
      }
      mx = tq_warp_max(mx);
      const float m_old = m_sh[r];
      const float m_new = tq_max(m_old, mx);
      const float m_use = m_new == -TQ_INF ? 0.0f : m_new;  // a row masked with -inf so far
      float sum = 0.0f;
      for (int i = lane; i < TILE; i += 32) {
        const float p = tq_exp(p_sh[i * R + r] - m_use);
        sum += p;
        p_sh[i * R + r] = i < n ? p * """ + _value_norm("tok0 + t0 + i") + r""" : 0.0f;
      }
      sum = tq_warp_sum(sum);
      if (lane == 0) {
        const float alpha = tq_exp(m_old - m_use);
        a_sh[r] = alpha;
        l_sh[r] = l_sh[r] * alpha + sum;
        m_sh[r] = m_new;
      }
    }
    TQ_BARRIER();

    // Values: lane owns coordinates [lane * VCPL, (lane + 1) * VCPL); its codes are one
    // field of VFIELD bits, read as two words once per token.
    TQ_UNROLL for (int i = 0; i < RW; ++i) {
      const int rr = VSPLIT ? i : warp + i * NWARPS;
      const float a = rr < R ? a_sh[rr % R] : 1.0f;
      TQ_UNROLL for (int k = 0; k < VCPL; ++k) {
        acc[i * VCPL + k] *= a;
      }
    }
    for (int tt = VSPLIT ? warp : 0; tt < n; tt += VSPLIT ? NWARPS : 1) {
      float w[RW];
      if (VSPLIT && VEC4) {
        TQ_UNROLL for (int r4 = 0; r4 < RW / 4; ++r4) {
          const float4 pv4 = p_sh4[((tt * R) / 4 + r4) % ((R * TILE + 3) / 4)];
          w[4 * r4] = pv4.x;
          w[(4 * r4 + 1) % RW] = pv4.y;
          w[(4 * r4 + 2) % RW] = pv4.z;
          w[(4 * r4 + 3) % RW] = pv4.w;
        }
      } else {
        TQ_UNROLL for (int i = 0; i < RW; ++i) {
          const int rr = VSPLIT ? i : warp + i * NWARPS;
          w[i] = rr < R ? p_sh[tt * R + rr % R] : 0.0f;
        }
      }
      const uint32_t lo = v_sh[tt * WV + vw0];
      const uint32_t hi = v_sh[tt * WV + vw0 + 1];
      const uint32_t field = (uint32_t)((((uint64_t)hi << 32) | lo) >> vsh0);
      TQ_UNROLL for (int k = 0; k < VCPL; ++k) {
        const uint32_t code = (field >> (k * VBITS)) & VMASK;
        const float cv = vc_sh[code * 32 + lane];
        TQ_UNROLL for (int i = 0; i < RW; ++i) {
          acc[i * VCPL + k] += w[i] * cv;
        }
      }
    }
  }

  const int64_t part = (int64_t)bh * n_splits + split;
  if (VSPLIT && NWARPS > 1) {
    // Sum the warps' partial outputs in shared memory (the query's space, no longer read).
    for (int wi = 0; wi < NWARPS; ++wi) {
      TQ_BARRIER();
      if (warp == wi) {
        TQ_UNROLL for (int i = 0; i < RW; ++i) {
          TQ_UNROLL for (int k = 0; k < VCPL; ++k) {
            const int o = (i * D + lane * VCPL + k) % QSZ;
            q_sh[o] = (wi == 0 ? 0.0f : q_sh[o]) + acc[i * VCPL + k];
          }
        }
      }
    }
    TQ_BARRIER();
    for (int i = tq_tid; i < R * D; i += NT) {
      o_part[part * R * D + i] = q_sh[i % QSZ];
    }
  } else {
    TQ_UNROLL for (int i = 0; i < RW; ++i) {
      const int rr = VSPLIT ? i : warp + i * NWARPS;
      if (rr < R) {
        TQ_UNROLL for (int k = 0; k < VCPL; ++k) {
          o_part[(part * R + rr) * D + lane * VCPL + k] = acc[i * VCPL + k];
        }
      }
    }
  }
  if (tq_tid < R) {
    ml_part[(part * R + tq_tid) * 2] = m_sh[tq_tid];
    ml_part[(part * R + tq_tid) * 2 + 1] = l_sh[tq_tid];
  }
"""

# Decode attention on tensor cores (CUDA only: mma.sync m16n8k16, fp16 in, fp32 accumulate):
# pass 1 as ATTENTION (same partial format), then the last block of each (batch, KV head)
# does REDUCE's merge, so one launch replaces two.
# The scalar kernel spends ~100 warp instructions per token on centroid lookups and FMAs
# (Nsight Compute, turbo4 at 128k: issue-bound, DRAM 20% busy); here the dot products run
# on tensor cores and one shared-memory lookup decodes two codes at once.
#
# Each warp walks its own tokens, 16 per step, with its own online softmax (no block
# barrier in the loop); the block merges its warps at the end.
# * Scores S^T[row][token] = Q K^T: A = the scaled, rotated query as fp16 (rows >= R zero),
#   B = keys. Thread (g = lane / 4, c = lane % 4) loads token g of each 8-token half and the
#   codes [c * D / 4, (c + 1) * D / 4) of it; its B fragment of k-chunk kk takes the code
#   pairs 2 kk and 2 kk + 1 of that range. A dot product does not care in which order the
#   dimensions are summed, so the query's A fragment uses the same dimension order.
# * Values O^T[dim][row] += V^T P^T: B = the probabilities, exactly the scores' output
#   fragment (row g, tokens 2c, 2c + 1 of each half) times the value norms, as fp16;
#   A = value centroids for tokens (2c, 2c + 1) and (2c + 8, 2c + 9) at two dimensions per
#   16-dimension tile, thread g owning the stored dimensions [g * D / 8, (g + 1) * D / 8).
# * Decoding: a table of 2^(2 * BITS) half2 entries (the centroids of two codes) replicated
#   once per lane (entry e of lane l at word e * 32 + l, or e * 64 + l in WIDE rows: no
#   bank conflicts); keys look up the two adjacent codes of one token, values the same
#   dimension of two tokens. Keys and values share one table when they have the same
#   codebook (SAME_TABLE).
# * Rotations: both codecs' rotations are randomized Sylvester Hadamards (D is a power of
#   two), so rot and rot_t are their sign vectors [D] and the block rotates by fast
#   Walsh-Hadamard transforms, a warp per row (reading a dense [D, D] matrix per block
#   cost ~3 us at the start and ~2 us in the merge's tail on the H100).
# * Centred caches (CENTRED, see _CENTRE_PAIRS): a second mma per k-chunk of RoPE pairs
#   scores A = Y / max|Z| of row g (pair 8 kk + c in columns 2c, 2c + 1 as (Re, -Im), pair
#   8 kk + 4 + c in 2c + 8, 2c + 9) against B = the fixed table (cos, sin)(u w) of the
#   step's token u = 8 h + g; each thread keeps row g's Y of its 16 pairs in float32 and
#   turns it by e^{i 16 NWARPS w} per step (the warp's next tokens).
# Templates: D (64 or 128), R (<= 8 rows), L, NREP, KBITS / VBITS (2..4), WK / WV, SAME_TABLE,
# SCALE_BITS, QT (the query's and the output's dtype), MASK_MODE, MB, MH, ML, NT (128),
# HAS_SINKS, CENTRED, RDIMS (a multiple of 16), RTRAD, PREFETCH (token rows requested into L2
# PF steps ahead inside the loop), WIDE (256-byte table rows), BULK (token rows copied into
# shared memory BULK steps ahead by the copy engine; sm_90 and later).
ATTENTION_TC = r"""
  constexpr int NWARPS = NT / 32;
  constexpr int KC = D / 16;                 // k-chunks of the scores = m-tiles of the values
  constexpr int KSPAN = (D / 4) * KBITS;     // bits of one thread's key codes
  constexpr int VSPAN = (D / 8) * VBITS;     // bits of one thread's value codes
  constexpr int NWK = KSPAN % 32 ? KSPAN / 32 + 2 : KSPAN / 32;  // words read per key
  constexpr int NWV = VSPAN % 32 ? VSPAN / 32 + 2 : VSPAN / 32;
  constexpr int AWK = (KSPAN + 31) / 32;     // words after alignment
  constexpr int AWV = (VSPAN + 31) / 32;
  constexpr int KTAB = 1 << (2 * KBITS);
  constexpr int VTAB = SAME_TABLE ? 0 : 1 << (2 * VBITS);
  // Table rows: entry e of lane l at byte (e << TSH) + 4 l. Wide rows (256 bytes, WIDE) put
  // a byte-sized pair index straight into an address (one byte permute, see tq_pair_addr);
  // their upper 128 bytes hold the value table where it differs from the keys'.
  constexpr int TSH = WIDE ? 8 : 7;
  constexpr int TABLE_WORDS = WIDE ? (KTAB > VTAB ? KTAB : VTAB) * 64 : (KTAB + VTAB) * 32;
  constexpr int MERGE = NWARPS * (R * D + 2 * R);
  constexpr int BIG = TABLE_WORDS > MERGE ? TABLE_WORDS : MERGE;
  constexpr float NEG = -1e30f;

  // Bulk copies (BULK > 0: token rows on sm_90 and later): each warp keeps the rows of its
  // next BULK steps in flight into stage buffers of its own, after the table space, each
  // with a barrier that completes when its copy has landed.
  constexpr int DEPTH = BULK > 0 ? BULK : 1;
  constexpr int STAGE = 16 * (WK + WV + 1);  // words: a step's 16 token rows
  constexpr int STAGES = BULK > 0 ? NWARPS * DEPTH * STAGE : 0;
  // Pair tables; the warps' results at the end; then the stages. Dynamic: wide tables and
  // stages pass the 48 KiB of static shared memory (launch.TensorCorePlan.dynamic_words).
  TQ_DYNAMIC_SHARED(uint32_t, big_sh, BIG + STAGES);
  TQ_SHARED uint64_t bar_sh[NWARPS * DEPTH];
  TQ_SHARED float q_sh[D * R];                // [D][R]
  TQ_SHARED float qmax_sh[R];                 // max |q| of each row
  // Centring: NP pairs in KCC k-chunks; B fragments [h][kk][g][c][2] as half2 (cos, sin);
  // the per-step turn e^{i 16 NWARPS w} [pair][re, im]; max |Z| and c0 of each row.
  constexpr int NP = CENTRED ? RDIMS / 2 : 8;
  constexpr int KCC = NP / 8;
  TQ_SHARED uint32_t ctab_sh[CENTRED ? 2 * KCC * 64 : 2];
  TQ_SHARED float dstep_sh[CENTRED ? 2 * NP : 2];
  TQ_SHARED float zmax_sh[R];
  TQ_SHARED float c0_sh[R];
  // The value table's offset from the keys' in bytes: none, the upper half of wide rows, or
  // past the key table.
  constexpr uint32_t VTAB_OFF = SAME_TABLE ? 0 : WIDE ? 128 : KTAB << TSH;
  TQ_SHARED_PTR(uint32_t) ktab = big_sh;
  TQ_SHARED_PTR(uint32_t) vtab = big_sh + VTAB_OFF / 4;

  const int lane = tq_tid & 31;
  const int warp = tq_tid >> 5;
  const int g = lane >> 2;
  const int c = lane & 3;
""" + _BLOCK_SPAN + r"""
  // This thread's first code word of a key / value and the bit offset in it.
  const int kw0 = (c * KSPAN) >> 5, ksh = (c * KSPAN) & 31;
  const int vw0 = (g * VSPAN) >> 5, vsh = (g * VSPAN) & 31;
  // Codes of one step: keys of tokens t0 + g and t0 + 8 + g; values and norms of tokens
  // t0 + {2c, 2c + 1, 2c + 8, 2c + 9}. The next step's are loaded before this one is
  // computed, so their memory latency overlaps the arithmetic. With PREFETCH (token rows;
  // the plan decides), the rows PF steps ahead are also requested into L2 (no registers
  // held), so more bytes are in flight than registers could hold.
  constexpr int PF = 4;
  // The norms stay fp16 bits (the key's in the low half) until the next step uses them: a
  // conversion here would wait on the load in this step.
  uint32_t kw[2][NWK], kw_n[2][NWK];
  uint32_t vw[4][NWV], vw_n[4][NWV];
  uint32_t nw[4], nw_n[4];
  // With BULK, the copy of this warp's step k (a lane-uniform call; none past the span):
  // the copy engine's where the rows' address and size are multiples of 16 bytes (a cache
  // keeps its capacity a multiple of 256 rows, so every head's rows start aligned), else
  // the lanes copy them. Rows of a last partial step past the copy are stale: consume()
  // zeroes their norms, and their codes only ever meet a zero weight.
  TQ_SHARED_PTR(uint32_t) stage = big_sh + BIG + warp * DEPTH * STAGE;
  TQ_SHARED_PTR(uint64_t) bars = bar_sh + warp * DEPTH;
  const bool bulk_ok = ((unsigned long long)(keys + tok0 * PROW) & 15u) == 0;
  auto produce = [&](int k) {
    const int t = t_begin + 16 * warp + k * 16 * NWARPS;
    if (BULK == 0 || t >= t_end) {
      return;
    }
    const int n = (cap - t < 16 ? cap - t : 16) * PROW;  // words of this head's rows from t
    TQ_SHARED_PTR(uint32_t) dst = stage + (k % DEPTH) * STAGE;
    const uint32_t* src = keys + (tok0 + t) * PROW;
    if (bulk_ok && n % 4 == 0) {
      if (lane == 0) {
        tq_bulk_copy(dst, src, 4 * n, bars + k % DEPTH);
      }
    } else {
      for (int i = lane; i < n; i += 32) {
        dst[i] = src[i];
      }
      tq_warp_sync();
      if (lane == 0) {
        tq_bar_arrive(bars + k % DEPTH);
      }
    }
  };
  // With BULK, step k's codes out of its stage, as load() reads them from memory (norms of
  // tokens past the span zeroed; their codes are never weighed).
  auto consume = [&](int k, uint32_t (&kx)[2][NWK], uint32_t (&vx)[4][NWV],
                     uint32_t (&nwx)[4]) {
    const int t0 = t_begin + 16 * warp + k * 16 * NWARPS;
    tq_bar_wait(bars + k % DEPTH, (k / DEPTH) & 1);
    TQ_SHARED_PTR(uint32_t) rows = stage + (k % DEPTH) * STAGE;
    TQ_UNROLL for (int h = 0; h < 2; ++h) {
      TQ_UNROLL for (int i = 0; i < NWK; ++i) {
        kx[h][i] = kw0 + i < WK ? rows[(8 * h + g) * PROW + kw0 + i] : 0u;
      }
    }
    TQ_UNROLL for (int j = 0; j < 4; ++j) {
      const int r = 2 * c + (j & 1) + 8 * (j >> 1);
      TQ_UNROLL for (int i = 0; i < NWV; ++i) {
        vx[j][i] = vw0 + i < WV ? rows[r * PROW + WK + vw0 + i] : 0u;
      }
      nwx[j] = t0 + r < t_end ? rows[r * PROW + WK + WV] : 0u;
    }
  };
  auto load = [&](int t0, uint32_t (&kx)[2][NWK], uint32_t (&vx)[4][NWV], uint32_t (&nwx)[4]) {
    TQ_UNROLL for (int h = 0; h < 2; ++h) {
      const int t = t0 + 8 * h + g;
      TQ_UNROLL for (int i = 0; i < NWK; ++i) {
        const bool ok = t < t_end && kw0 + i < WK;
        kx[h][i] = ok ? keys[(tok0 + t) * (PACKED ? PROW : WK) + kw0 + i] : 0u;
      }
    }
    TQ_UNROLL for (int j = 0; j < 4; ++j) {
      const int t = t0 + 2 * c + (j & 1) + 8 * (j >> 1);
      TQ_UNROLL for (int i = 0; i < NWV; ++i) {
        const bool ok = t < t_end && vw0 + i < WV;
        vx[j][i] = ok ? values[(tok0 + t) * (PACKED ? PROW : WV) + (PACKED ? WK : 0) + vw0 + i]
                      : 0u;
      }
      if (PACKED) {  // one load for the word that holds both norms
        nwx[j] = t < t_end ? keys[(tok0 + t) * PROW + WK + WV] : 0u;
      } else {  // (four arrays: batch caches' views; converted both ways, exactly)
        nwx[j] = t < t_end ? tq_half_word(TQ_HALF_TO_FLOAT(key_norms[tok0 + t])) |
                                 (tq_half_word(TQ_HALF_TO_FLOAT(value_norms[tok0 + t])) << 16)
                           : 0u;
      }
    }
  };
  // Everything the set-up reads from memory is requested before anything waits on it: the
  // query, the signs and the centroids first (they gate the set-up), then the first step's
  // codes; so the block waits on one memory latency instead of one per stage.
  // The query goes into the keys' basis as q -> (q * s) H / sqrt(D): rot holds the key
  // rotation's signs s (a Sylvester Hadamard, see codec rotation.py), so a transform in
  // registers replaces a matrix read per block.
  constexpr int EPL = D / 32;                 // coordinates per lane of a row held by one warp
  constexpr int QPT = (D * R + NT - 1) / NT;  // query elements per thread
  constexpr int NKC = 1 << KBITS;
  constexpr int NCENT = NKC + (SAME_TABLE ? 0 : 1 << VBITS);
  TQ_SHARED float cent_sh[NCENT];
  const float inv_sqrt_d = 1.0f / tq_sqrt((float)D);
  {
    constexpr int QSZ = D * R;  // q_sh's size, as _CENTRE_PAIRS reads it
    // Scores are kept in base 2 (the query carries log2 e, masks and sinks are scaled to
    // match): exp2 is one MUFU instruction where expf takes seven.
    const float scale = tq_as_float(SCALE_BITS) * TQ_LOG2E;
    float q_in[QPT];
    TQ_UNROLL for (int k = 0; k < QPT; ++k) {
      const int i = tq_tid + k * NT;
      q_in[k] = i < D * R ? static_cast<float>(q[(int64_t)bh * R * D + i]) * scale : 0.0f;
    }
    float q_sign[EPL];
    TQ_UNROLL for (int k = 0; k < EPL; ++k) {
      q_sign[k] = rot[lane + 32 * k] * inv_sqrt_d;
    }
    static_assert(NCENT <= NT, "a thread per centroid");
    const float cent = tq_tid < NKC ? kcent[tq_tid] : tq_tid < NCENT ? vcent[tq_tid - NKC] : 0.0f;
    if (BULK > 0) {  // this warp's first DEPTH steps in flight while the block sets up
      if (lane < DEPTH) {
        tq_bar_init(bars + lane);
      }
      tq_warp_sync();
      TQ_UNROLL for (int k = 0; k < DEPTH; ++k) {
        produce(k);
      }
    } else {
      load(t_begin + 16 * warp, kw, vw, nw);  // in flight while the block sets up
    }
    if (PACKED && BULK == 0) {  // and the rows of the next PF - 1 steps into L2 (see PF)
      const int t_lo = t_begin + 16 * NWARPS;
      const int t_hi = t_begin + PF * 16 * NWARPS < t_end ? t_begin + PF * 16 * NWARPS : t_end;
      const char* lo = reinterpret_cast<const char*>(keys + (tok0 + t_lo) * PROW);
      const int n_lines = t_hi > t_lo ? ((t_hi - t_lo) * PROW * 4 + 127) / 128 : 0;
      for (int i = tq_tid; i < n_lines; i += NT) {
        tq_prefetch_l2(lo + 128 * i);
      }
    }
    if (tq_tid < NCENT) {  // (a store waits for its value: only now, after every request)
      cent_sh[tq_tid] = cent;
    }
    TQ_UNROLL for (int k = 0; k < QPT; ++k) {
      const int i = tq_tid + k * NT;
      if (i < D * R) {
        const int r = i / D;
        q_sh[(i - r * D) * R + r] = q_in[k];
      }
    }
    TQ_BARRIER();
    if (CENTRED) {  // Z of each row into big_sh [R][NP][re, im] (the tables come later)
      TQ_SHARED_PTR(float) z_sh = (TQ_SHARED_PTR(float))big_sh;
      for (int r = warp; r < R; r += NWARPS) {  // a warp per row
        float m = 0.0f;
        float c0 = 0.0f;
        for (int j = lane; j < NP; j += 32) {""" + _CENTRE_PAIRS + r"""
          z_sh[(r * NP + j) * 2] = zr;
          z_sh[(r * NP + j) * 2 + 1] = zi;
          m = tq_max(m, tq_max(zr < 0.0f ? -zr : zr, zi < 0.0f ? -zi : zi));
        }
        for (int d = RDIMS + lane; d < D; d += 32) {
          c0 += q_sh[d * R + r] * kmean[(int64_t)bh * D + d];
        }
        m = tq_warp_max(m);
        c0 = tq_warp_sum(c0);
        if (lane == 0) {
          zmax_sh[r] = m;
          c0_sh[r] = c0;
        }
      }
      for (int i = tq_tid; i < 2 * KCC * 64; i += NT) {  // i = (((h KCC + kk) 8 + g) 4 + c) 2 + w
        const int j = 8 * ((i >> 6) % KCC) + 4 * (i & 1) + ((i >> 1) & 3);
        const float a = (float)(8 * ((i >> 6) / KCC) + ((i >> 3) & 7)) * omega[j];
        ctab_sh[i] = tq_pack_half2(tq_cos(a), tq_sin(a));
      }""" + _turn_table("16 * NWARPS") + r"""
      TQ_BARRIER();  // every row's Z is taken before the transform overwrites q_sh
    }
    for (int r = warp; r < R; r += NWARPS) {  // a warp per row
      float v[EPL];
      TQ_UNROLL for (int k = 0; k < EPL; ++k) {
        v[k] = q_sh[(lane + 32 * k) * R + r] * q_sign[k];
      }""" + _WARP_WALSH_HADAMARD + r"""
      float m = 0.0f;
      TQ_UNROLL for (int k = 0; k < EPL; ++k) {
        q_sh[(lane + 32 * k) * R + r] = v[k];
        m = tq_max(m, v[k] < 0.0f ? -v[k] : v[k]);
      }
      m = tq_warp_max(m);
      if (lane == 0) {
        qmax_sh[r] = m;
      }
    }
  }
  // Row g's Y / max|Z| at this warp's first step, for pairs 8 kk + 4 w + c.
  float yc[KCC][2][2];
  float z_max = 0.0f;
  float c0_row = 0.0f;
  if (CENTRED) {
    TQ_SHARED_PTR(float) z_sh = (TQ_SHARED_PTR(float))big_sh;
    z_max = g < R ? zmax_sh[g] : 0.0f;
    c0_row = g < R ? c0_sh[g] : 0.0f;
    const float z_inv = z_max > 0.0f ? 1.0f / z_max : 0.0f;
    const float t_first = (float)(t_begin + 16 * warp);
    TQ_UNROLL for (int kk = 0; kk < KCC; ++kk) {
      TQ_UNROLL for (int w = 0; w < 2; ++w) {
        const int j = 8 * kk + 4 * w + c;
        const float zr = g < R ? z_sh[(g * NP + j) * 2] * z_inv : 0.0f;
        const float zi = g < R ? z_sh[(g * NP + j) * 2 + 1] * z_inv : 0.0f;
        const float a = t_first * omega[j];
        const float cs = tq_cos(a), sn = tq_sin(a);""" + _complex_product(
    "yc[kk][w][0]", "yc[kk][w][1]", ("zr", "zi"), ("cs", "sn"), 8) + r"""
      }
    }
    TQ_BARRIER();  // every Z is read before the tables overwrite big_sh
  }
  // The tables, four copies of an entry per store; unrolled, so the stores of a thread do not
  // wait on one another's shared loads.
  TQ_UNROLL for (int k = 0; k < (KTAB * 8 + NT - 1) / NT; ++k) {
    const int i = tq_tid + k * NT;  // lanes 4 (i & 7).. of entry e
    const int e = i >> 3;
    if (i < KTAB * 8) {
      tq_fill4(ktab + (e << (TSH - 2)) + 4 * (i & 7),
               tq_pack_half2(cent_sh[e & (NKC - 1)], cent_sh[e >> KBITS]));
    }
  }
  TQ_SHARED_PTR(float) vc = cent_sh + NKC;  // the value centroids, where not the same table
  TQ_UNROLL for (int k = 0; k < (VTAB * 8 + NT - 1) / NT; ++k) {
    const int i = tq_tid + k * NT;
    const int e = i >> 3;
    if (i < VTAB * 8) {
      tq_fill4(vtab + (e << (TSH - 2)) + 4 * (i & 7),
               tq_pack_half2(vc[e & ((1 << VBITS) - 1)], vc[e >> VBITS]));
    }
  }
  TQ_BARRIER();

  // A fragments of the query: rows g and g + 8 (always padding: R <= 8) of each k-chunk.
  // Row g goes in as q / max|q| (fp16 cannot hold every query); scores get max|q| back.
  const float q_max = g < R ? qmax_sh[g] : 0.0f;
  const float q_inv = q_max > 0.0f ? 1.0f / q_max : 0.0f;
  uint32_t qa[KC][2];
  TQ_UNROLL for (int kk = 0; kk < KC; ++kk) {
    TQ_UNROLL for (int h = 0; h < 2; ++h) {
      const int d = c * (D / 4) + 2 * (2 * kk + h);  // first dimension of the code pair
      qa[kk][h] = g < R ? tq_pack_half2(q_sh[d * R + g] * q_inv, q_sh[(d + 1) * R + g] * q_inv)
                        : 0u;
    }
  }

  float acc[KC][4];
  TQ_UNROLL for (int i = 0; i < KC; ++i) {
    TQ_UNROLL for (int j = 0; j < 4; ++j) {
      acc[i][j] = 0.0f;
    }
  }
  float m_run = -TQ_INF;  // row g, replicated over the 4 lanes of the group
  float l_run = 0.0f;     // this lane's share of row g's sum

  // A pair index (2 * BITS bits at bit pos of the 64 bits hi:lo) as a table address. A byte
  // (4-bit codes) takes one byte permute: in wide rows the permute is the address
  // (tq_pair_addr), in narrow rows a multiply-add on the FMA pipe follows (a shift and a
  // mask on the integer pipe instead cost turbo4 4% at 128k tokens, turbo4c 16%). Other
  // widths are shifted straight to bit TSH (a funnel shift where they straddle lo and hi)
  // and masked in one LOP3 that also sets the lane's offset; the table's address is
  // warp-uniform, so the shared load adds it for free (turbo3 77.4 -> 67.0 us at 128k,
  // turbo2 64.1 -> 61.7: a separate extract, mask and multiply-add before).
  const tq_saddr_t tab_base = tq_uniform_addr(tq_shared_addr(big_sh));
  const tq_saddr_t lane_tab = tq_shared_addr(big_sh + lane);  // this lane's entry 0
  const uint32_t lane4 = 4 * lane;
  auto lookup = [&](uint32_t tab_off, uint32_t lo, uint32_t hi, int pos, int width) {
    if (width == 8) {
      return WIDE ? tq_lds(tab_base + tq_pair_addr(lo, pos >> 3, lane4 + tab_off))
                  : tq_lds(lane_tab + tab_off + (tq_byte(lo, pos >> 3) << TSH));
    }
    const uint32_t x = pos >= TSH ? tq_funnel(lo, hi, pos - TSH) : lo << (TSH - pos);
    return tq_lds(tab_base + tab_off + ((x & (((1u << width) - 1) << TSH)) | lane4));
  };
  const int r_mask = g < R ? g : 0;  // a valid row for mask reads of padding rows
  const int mb = MB ? b : 0;
  const int mh = MH ? kvh * NREP + r_mask / L : 0;
  const int ml = ML ? r_mask % L : 0;
  const int mh_n = MH ? n_kv_heads * NREP : 1;
  const int ml_n = ML ? L : 1;


  // One step of this warp: the codes of tokens t0.. are in (kw, vw, nw); the next step's go
  // into (kw_n, vw_n, nw_n). The parameters take the buffers' names, so the body reads as
  // a loop body; the caller passes the two buffers either way round.
  auto step = [&](int t0, uint32_t (&kw)[2][NWK], uint32_t (&vw)[4][NWV], uint32_t (&nw)[4],
                  uint32_t (&kw_n)[2][NWK], uint32_t (&vw_n)[4][NWV], uint32_t (&nw_n)[4]) {
    if (BULK == 0) {
      load(t0 + 16 * NWARPS, kw_n, vw_n, nw_n);  // guarded: zeros past the span
    }
    if (PREFETCH && t0 + PF * 16 * NWARPS < t_end) {  // this warp's 16 rows PF steps ahead
      const int t = t0 + PF * 16 * NWARPS;
      const int rows = t_end - t < 16 ? t_end - t : 16;
      if (lane * 128 < rows * PROW * 4) {
        tq_prefetch_l2(reinterpret_cast<const char*>(keys + (tok0 + t) * PROW) + 128 * lane);
      }
    }
    // Scores: two 8-token halves, each KC mma over the dimensions.
    float s[2][4];
    TQ_UNROLL for (int h = 0; h < 2; ++h) {
      uint32_t a[NWK > AWK ? NWK : AWK];
      TQ_UNROLL for (int i = 0; i < AWK; ++i) {
        a[i] = NWK > AWK ? tq_funnel(kw[h][i], kw[h][(i + 1) % NWK], ksh) : kw[h][i];
      }
      TQ_UNROLL for (int j = 0; j < 4; ++j) {
        s[h][j] = 0.0f;
      }
      TQ_UNROLL for (int kk = 0; kk < KC; ++kk) {
        uint32_t bfrag[2];
        TQ_UNROLL for (int hh = 0; hh < 2; ++hh) {
          const int bit = (2 * kk + hh) * 2 * KBITS;  // code pair within this thread's span
          bfrag[hh] = lookup(0u, a[bit >> 5], a[((bit >> 5) + 1) % AWK], bit & 31, 2 * KBITS);
        }
        tq_mma_16816(s[h], qa[kk][0], tq_any_bits(), qa[kk][1], tq_any_bits(), bfrag[0],
                     bfrag[1]);
      }
    }

    // Centring: sc = Y (Re, -Im) . (cos, sin)(u w), in the scores' layout; then Y turns
    // to the warp's next step.
    float sc[2][4];
    TQ_UNROLL for (int h = 0; h < 2; ++h) {
      TQ_UNROLL for (int j = 0; j < 4; ++j) {
        sc[h][j] = 0.0f;
      }
    }
    if (CENTRED) {
      TQ_UNROLL for (int kk = 0; kk < KCC; ++kk) {  // a chunk's A fragment serves both halves
        const uint32_t a0 = tq_pack_half2(yc[kk][0][0], -yc[kk][0][1]);
        const uint32_t a2 = tq_pack_half2(yc[kk][1][0], -yc[kk][1][1]);
        TQ_UNROLL for (int h = 0; h < 2; ++h) {
          const int e = (((h * KCC + kk) * 8 + g) * 4 + c) * 2;
          tq_mma_16816(sc[h], a0, tq_any_bits(), a2, tq_any_bits(), ctab_sh[e],
                       ctab_sh[e + 1]);
        }
        TQ_UNROLL for (int w = 0; w < 2; ++w) {
          const int j = 8 * kk + 4 * w + c;
          const float dr = dstep_sh[2 * j], di = dstep_sh[2 * j + 1];
          const float yr = yc[kk][w][0], yi = yc[kk][w][1];""" + _complex_product(
    "yc[kk][w][0]", "yc[kk][w][1]", ("yr", "yi"), ("dr", "di"), 10) + r"""
        }
      }
    }

    // Online softmax of row g over these 16 tokens (s[h][0..1]: tokens 8h + 2c + {0, 1}).
    float mx = -TQ_INF;
    TQ_UNROLL for (int j = 0; j < 4; ++j) {
      const int h = j >> 1;
      const int t = t0 + 8 * h + 2 * c + (j & 1);
      float v = s[h][j & 1] * (tq_half_bits(nw[j] & 0xFFFFu) * q_max);
      if (CENTRED) {
        v += sc[h][j & 1] * z_max + c0_row;
      }
      if (MASK_MODE == 1 && t > T - L + r_mask % L) {
        v = NEG;
      }
      if (MASK_MODE == 2 && t < t_end) {
        v += mask[(((int64_t)mb * mh_n + mh) * ml_n + ml) * T + t] * TQ_LOG2E;
      }
      v = t < t_end ? v : -TQ_INF;
      s[h][j & 1] = v;
      mx = tq_max(mx, v);
    }
    mx = tq_max(mx, tq_shfl_xor(mx, 1));
    mx = tq_max(mx, tq_shfl_xor(mx, 2));
    const float m_new = tq_max(m_run, mx);
    const float m_use = m_new == -TQ_INF ? 0.0f : m_new;
    const float alpha = tq_exp2(m_run - m_use);
    m_run = m_new;
    float p[4];
    float psum = 0.0f;
    TQ_UNROLL for (int j = 0; j < 4; ++j) {
      const float e = tq_exp2(s[j >> 1][j & 1] - m_use);
      psum += e;
      p[j] = e * tq_half_bits(nw[j] >> 16);
    }
    l_run = l_run * alpha + psum;
    // The value accumulators hold rows 2c and 2c + 1: their rescale factors live in the
    // groups of those rows. Late in a span the maxima rarely move: no row rescales then.
    if (tq_warp_any(alpha != 1.0f)) {
      const float a0 = tq_shfl(alpha, 8 * c);
      const float a1 = tq_shfl(alpha, 8 * c + 4);
      TQ_UNROLL for (int mt = 0; mt < KC; ++mt) {
        acc[mt][0] *= a0;
        acc[mt][1] *= a1;
        acc[mt][2] *= a0;
        acc[mt][3] *= a1;
      }
    }
    const uint32_t pb0 = g < R ? tq_pack_half2(p[0], p[1]) : 0u;
    const uint32_t pb1 = g < R ? tq_pack_half2(p[2], p[3]) : 0u;

    // Values: m-tile mt covers the stored dimensions g * D / 8 + 2 mt + {0, 1}.
    uint32_t av[4][NWV > AWV ? NWV : AWV];
    TQ_UNROLL for (int j = 0; j < 4; ++j) {
      TQ_UNROLL for (int i = 0; i < AWV; ++i) {
        av[j][i] = NWV > AWV ? tq_funnel(vw[j][i], vw[j][(i + 1) % NWV], vsh) : vw[j][i];
      }
    }
    // Interleave the codes of each token pair once, in chunks of VCH bits that hold whole
    // codes (24 bits, 8 codes, for 3-bit codes; 32 otherwise): field k (2 * VBITS bits) of
    // zv[p][o][i] is the pair index of dimension 2k + o of chunk i for tokens 2p, 2p + 1 of
    // the four (the first token's code in the low half).
    constexpr int VCH = VBITS == 3 ? 24 : 32;
    constexpr int NCH = (VSPAN + VCH - 1) / VCH;
    constexpr int VPAIRS = VCH / (2 * VBITS);  // even dimensions per chunk
    constexpr uint32_t EVEN = VBITS == 4 ? 0x0F0F0F0Fu : VBITS == 3 ? 0x001C71C7u : 0x33333333u;
    constexpr uint32_t ODD = EVEN << VBITS;
    uint32_t zv[2][2][NCH];
    TQ_UNROLL for (int pr = 0; pr < 2; ++pr) {
      TQ_UNROLL for (int i = 0; i < NCH; ++i) {
        const int bit = i * VCH;
        const int w = bit >> 5, w1 = (w + 1) % AWV;  // 3-bit codes' 2nd chunk: bit 24 of w 0
        const uint32_t x = bit & 31 ? tq_funnel(av[2 * pr][w], av[2 * pr][w1], bit & 31)
                                    : av[2 * pr][w];
        const uint32_t y = bit & 31 ? tq_funnel(av[2 * pr + 1][w], av[2 * pr + 1][w1], bit & 31)
                                    : av[2 * pr + 1][w];
        zv[pr][0][i] = (x & EVEN) | ((y << VBITS) & ODD);
        zv[pr][1][i] = ((x >> VBITS) & EVEN) | (y & ODD);
      }
    }
    TQ_UNROLL for (int mt = 0; mt < KC; ++mt) {
      // f: (dim 2mt + (f & 1), tokens of pair f >> 1): a0 (dim, 2c..), a1 (dim + 1, 2c..),
      // a2 (dim, 2c + 8..), a3 (dim + 1, 2c + 8..)
      uint32_t afrag[4];
      TQ_UNROLL for (int f = 0; f < 4; ++f) {
        const uint32_t z = zv[f >> 1][f & 1][mt / VPAIRS];
        afrag[f] = lookup(VTAB_OFF, z, z, (mt % VPAIRS) * 2 * VBITS, 2 * VBITS);
      }
      tq_mma_16816(acc[mt], afrag[0], afrag[1], afrag[2], afrag[3], pb0, pb1);
    }
  };
  // Two steps per iteration, the buffers trading places: the next step's codes are never
  // copied (a copy waits for the load), so nothing waits on them before their first use.
  // With BULK, a step reads its codes out of its stage and then hands the stage to the copy
  // of the step DEPTH later.
  for (int t0 = t_begin + 16 * warp, k = 0; BULK > 0 && t0 < t_end; t0 += 16 * NWARPS, ++k) {
    consume(k, kw, vw, nw);
    step(t0, kw, vw, nw, kw_n, vw_n, nw_n);
    tq_warp_sync();  // every lane has read stage k % DEPTH
    produce(k + DEPTH);
  }
  for (int t0 = t_begin + 16 * warp; BULK == 0 && t0 < t_end; t0 += 2 * 16 * NWARPS) {
    step(t0, kw, vw, nw, kw_n, vw_n, nw_n);
    if (t0 + 16 * NWARPS >= t_end) {
      break;
    }
    step(t0 + 16 * NWARPS, kw_n, vw_n, nw_n, kw, vw, nw);
  }

  // Merge the warps: [warp][R][D] outputs, then [warp][R] maxima and sums.
  l_run += tq_shfl_xor(l_run, 1);
  l_run += tq_shfl_xor(l_run, 2);
  TQ_BARRIER();  // every warp is done with the tables
  TQ_SHARED_PTR(float) o_sh = (TQ_SHARED_PTR(float))big_sh;
  TQ_SHARED_PTR(float) m_sh = o_sh + NWARPS * R * D;
  TQ_SHARED_PTR(float) l_sh = m_sh + NWARPS * R;
  TQ_UNROLL for (int mt = 0; mt < KC; ++mt) {
    TQ_UNROLL for (int f = 0; f < 4; ++f) {
      const int r = 2 * c + (f & 1);
      const int d = g * (D / 8) + 2 * mt + (f >> 1);
      if (r < R) {
        o_sh[(warp * R + r) * D + d] = acc[mt][f];
      }
    }
  }
  if (c == 0 && g < R) {
    m_sh[warp * R + g] = m_run;
    l_sh[warp * R + g] = l_run;
  }
  TQ_BARRIER();
  // Each warp's weight per row, once (m_sh in place), and the block's maximum and sum.
  const int64_t part = (int64_t)bh * n_splits + split;
  if (tq_tid < R) {
    const int r = tq_tid;
    float m = -TQ_INF;
    TQ_UNROLL for (int w = 0; w < NWARPS; ++w) {
      m = tq_max(m, m_sh[w * R + r]);
    }
    const float m_use = m == -TQ_INF ? 0.0f : m;
    float l = 0.0f;
    TQ_UNROLL for (int w = 0; w < NWARPS; ++w) {
      const float wt = tq_exp2(m_sh[w * R + r] - m_use);
      m_sh[w * R + r] = wt;
      l += wt * l_sh[w * R + r];
    }
    ml_part[(part * R + r) * 2] = m;
    ml_part[(part * R + r) * 2 + 1] = l;
  }
  TQ_BARRIER();
  TQ_UNROLL for (int k = 0; k < (R * D + NT - 1) / NT; ++k) {
    const int i = tq_tid + k * NT;
    if (i < R * D) {
      const int r = i / D;
      float o = 0.0f;
      TQ_UNROLL for (int w = 0; w < NWARPS; ++w) {
        o += m_sh[w * R + r] * o_sh[w * R * D + i];
      }
      o_part[part * R * D + i] = o;
    }
  }

  // Pass 2 in the same launch: the block of this (batch, KV head) that finishes last merges
  // every span's partials (and the sink), normalizes and rotates back, as REDUCE does in a
  // launch of its own. counter[bh] is zero between launches: a block counts itself in once
  // its partials are visible device-wide, and the last one sets the count back to zero.
  TQ_SHARED int last_sh;
  tq_fence();
  TQ_BARRIER();
  if (tq_tid == 0) {
    last_sh = tq_atomic_inc(counter + bh) == (uint32_t)(n_splits - 1);
  }
  TQ_BARRIER();
  if (!last_sh) {
    return;
  }
  tq_fence();
  if (tq_tid == 0) {
    tq_atomic_reset(counter + bh);
  }
  float o_sign[EPL];  // the value rotation's signs, in flight while the spans merge
  TQ_UNROLL for (int k = 0; k < EPL; ++k) {
    o_sign[k] = rot_t[lane + 32 * k] * inv_sqrt_d;
  }
  // big_sh again (the warps' results are written out): merged rows, 1 / sums, span weights.
  // launch.TensorCorePlan.max_splits keeps R * n_splits weights within it.
  TQ_SHARED_PTR(float) y_sh = (TQ_SHARED_PTR(float))big_sh;  // [R][D]
  TQ_SHARED_PTR(float) inv_sh = y_sh + R * D;                // [R]
  TQ_SHARED_PTR(float) w_sh = inv_sh + R;                    // [R][n_splits]
  const int64_t first = (int64_t)bh * n_splits;
  const float2* ml_part2 = reinterpret_cast<const float2*>(ml_part);
  for (int r = warp; r < R; r += NWARPS) {  // one warp per row, its lanes over the spans
    // One pass over the spans' maxima and sums: each lane keeps a running (max, sum) and
    // parks the spans' maxima in w_sh, which become weights once the row's maximum is known.
    // Two spans per lane are requested before either is used (one wait on L2 for up to 64).
    float m = -TQ_INF;
    float l = 0.0f;
    for (int s0 = lane; s0 < n_splits; s0 += 64) {
      float2 ml[2];
      TQ_UNROLL for (int u = 0; u < 2; ++u) {
        const int s = s0 + 32 * u;
        ml[u] = s < n_splits ? tq_load_cg2(ml_part2 + (first + s) * R + r)
                             : make_float2(-TQ_INF, 0.0f);
      }
      TQ_UNROLL for (int u = 0; u < 2; ++u) {
        const int s = s0 + 32 * u;
        if (s < n_splits) {
          w_sh[r * n_splits + s] = ml[u].x;
        }
        const float mn = tq_max(m, ml[u].x);
        const float mu = mn == -TQ_INF ? 0.0f : mn;
        l = l * tq_exp2(m - mu) + ml[u].y * tq_exp2(ml[u].x - mu);
        m = mn;
      }
    }
    float m_row = tq_warp_max(m);
    float sink = 0.0f;
    if (HAS_SINKS) {
      sink = sinks[kvh * NREP + r / L] * TQ_LOG2E;
      m_row = tq_max(m_row, sink);
    }
    const float m_use = m_row == -TQ_INF ? 0.0f : m_row;
    const float den = tq_warp_sum(l * tq_exp2(m - m_use));
    for (int s = lane; s < n_splits; s += 32) {  // the lane's own entries: no barrier
      w_sh[r * n_splits + s] = tq_exp2(w_sh[r * n_splits + s] - m_use);
    }
    if (lane == 0) {
      inv_sh[r] = 1.0f / (den + (HAS_SINKS ? tq_exp2(sink - m_use) : 0.0f));
    }
  }
  TQ_BARRIER();
  {
    // Each thread sums whole float4s of the rows over the spans, SPB spans per batch, so about
    // 64 floats of loads are in flight per thread (a load waits on L2, whose latency this
    // merge is bound by).
    constexpr int Q4 = R * D / 4;  // float4s of the merged rows (D % 32 == 0)
    constexpr int QPT4 = (Q4 + NT - 1) / NT;
    constexpr int SPB = QPT4 >= 16 ? 1 : 16 / QPT4;
    const float4* o_part4 = reinterpret_cast<const float4*>(o_part);
    float4 o[QPT4];
    TQ_UNROLL for (int k = 0; k < QPT4; ++k) {
      o[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    for (int s0 = 0; s0 < n_splits; s0 += SPB) {
      float4 x[SPB][QPT4];
      TQ_UNROLL for (int j = 0; j < SPB; ++j) {
        TQ_UNROLL for (int k = 0; k < QPT4; ++k) {
          const int i4 = tq_tid + k * NT;
          x[j][k] = s0 + j < n_splits && i4 < Q4
                        ? tq_load_cg4(o_part4 + (first + s0 + j) * Q4 + i4)
                        : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
      }
      TQ_UNROLL for (int j = 0; j < SPB; ++j) {
        TQ_UNROLL for (int k = 0; k < QPT4; ++k) {
          const int i4 = tq_tid + k * NT;
          const float w = s0 + j < n_splits && i4 < Q4 ? w_sh[(4 * i4 / D) * n_splits + s0 + j]
                                                       : 0.0f;
          o[k].x += w * x[j][k].x;
          o[k].y += w * x[j][k].y;
          o[k].z += w * x[j][k].z;
          o[k].w += w * x[j][k].w;
        }
      }
    }
    TQ_UNROLL for (int k = 0; k < QPT4; ++k) {
      const int i4 = tq_tid + k * NT;
      if (i4 < Q4) {
        const float inv = inv_sh[4 * i4 / D];
        y_sh[4 * i4] = o[k].x * inv;
        y_sh[4 * i4 + 1] = o[k].y * inv;
        y_sh[4 * i4 + 2] = o[k].z * inv;
        y_sh[4 * i4 + 3] = o[k].w * inv;
      }
    }
  }
  // Back from the values' basis: y -> (y H / sqrt(D)) * s with rot_t the value signs s.
  TQ_BARRIER();
  for (int r = warp; r < R; r += NWARPS) {  // a warp per row
    float v[EPL];
    TQ_UNROLL for (int k = 0; k < EPL; ++k) {
      v[k] = y_sh[r * D + lane + 32 * k];
    }""" + _WARP_WALSH_HADAMARD + r"""
    TQ_UNROLL for (int k = 0; k < EPL; ++k) {
      const int d = lane + 32 * k;
      out[((int64_t)bh * R + r) * D + d] = static_cast<QT>(v[k] * o_sign[k]);
    }
  }
"""

# Decode attention, pass 2: merge the spans of one row (and the sink), normalize, and
# rotate back from the value codec's basis. One block per (batch * KV head, row), one
# thread per output coordinate. rot_t is the value rotation's matrix_t [D, D]; the output is
# written in the queries' dtype OutT, so no cast follows.
REDUCE = r"""
  TQ_SHARED float y_sh[D];
  const int d = tq_tid;
  const int row = tq_bx;
  const int bh = row / R;
  const int r = row - bh * R;
  const int n_splits = meta[2];
  const int n_kv_heads = meta[3];
  const int64_t first = (int64_t)bh * n_splits;

  float m = -TQ_INF;
  TQ_UNROLL8 for (int s = 0; s < n_splits; ++s) {
    m = tq_max(m, ml_part[((first + s) * R + r) * 2]);
  }
  float sink = 0.0f;
  if (HAS_SINKS) {
    sink = sinks[(bh % n_kv_heads) * NREP + r / L];
    m = tq_max(m, sink);
  }
  const float m_use = m == -TQ_INF ? 0.0f : m;
  float num = 0.0f;
  float den = HAS_SINKS ? tq_exp(sink - m_use) : 0.0f;
  TQ_UNROLL8 for (int s = 0; s < n_splits; ++s) {
    const int64_t i = (first + s) * R + r;
    const float w = tq_exp(ml_part[i * 2] - m_use);
    den += w * ml_part[i * 2 + 1];
    num += w * o_part[i * D + d];
  }
  y_sh[d] = num / den;
  TQ_BARRIER();
  float o = 0.0f;
  TQ_UNROLL32 for (int j = 0; j < D; ++j) {  // 32 loads in flight: rot_t is cold here
    o += y_sh[j] * rot_t[j * D + d];
  }
  out[(int64_t)row * D + d] = static_cast<OutT>(o);
"""

# Encode new keys and values in one launch: norm, rotation, Lloyd-Max code by binary
# search over the boundaries, optional norm correction, dense packing. One thread per
# coordinate, one block per vector: blockIdx.y 0 keys, 1 values (a grid of height 1 encodes
# keys only). With PACKED a token's key and value go into one row of KW + VW + 1 words of pk
# (the last word holds both fp16 norms, the key's in the low half, each block storing its
# own half; nk / pv / nv are then unused). xk / xv are [N, D] in the model's dtype InT (read
# as is: no cast pass); rk / rv are the rotations' matrices [D, D] (y = u @ r); KBITS / VBITS
# with KW / VW words. Decode encodes a handful of vectors whose matrices are cold in the
# cache, so the kernel is bound by load latency: boundaries and centroids go to shared
# memory while the norm is reduced, and the rotation keeps 32 loads in flight per thread.
# The encode of new tokens up to its stores (ENCODE and APPEND share it): thread e < W
# holds word e of this block's packed codes in `word`, the norm to store is `stored`.
_ENCODE_CORE = r"""
  constexpr int NWARPS = D / 32;
  constexpr int PROW = KW + VW + 1;
  TQ_SHARED float u_sh[D];
  TQ_SHARED float red_sh[NWARPS];
  TQ_SHARED uint32_t c_sh[D];
  TQ_SHARED float bnd_sh[1 << (KBITS > VBITS ? KBITS : VBITS)];
  TQ_SHARED float cent_sh[1 << (KBITS > VBITS ? KBITS : VBITS)];
  const int e = tq_tid;
  const int lane = e & 31;
  const int warp = e >> 5;
  const int64_t row = tq_bx;
  const bool is_v = tq_by == 1;
  const int BITS = is_v ? VBITS : KBITS;
  const int W = is_v ? VW : KW;

  for (int i = e; i < (1 << BITS); i += D) {
    if (i + 1 < (1 << BITS)) {
      bnd_sh[i] = is_v ? bv[i] : bk[i];
    }
    cent_sh[i] = is_v ? cv_in[i] : ck[i];
  }
  const float xv = static_cast<float>(is_v ? xv_in[row * D + e] : xk[row * D + e]);
  float part_sum = tq_warp_sum(xv * xv);
  if (lane == 0) {
    red_sh[warp] = part_sum;
  }
  TQ_BARRIER();
  float norm2 = 0.0f;
  TQ_UNROLL for (int w = 0; w < NWARPS; ++w) {
    norm2 += red_sh[w];
  }
  const float norm = tq_sqrt(norm2);
  u_sh[e] = xv / tq_max(norm, 1e-30f);
  TQ_BARRIER();
  float y = 0.0f;
  if (is_v) {
    TQ_UNROLL32 for (int j = 0; j < D; ++j) {
      y += u_sh[j] * rv[j * D + e];
    }
  } else {
    TQ_UNROLL32 for (int j = 0; j < D; ++j) {
      y += u_sh[j] * rk[j * D + e];
    }
  }
  int code = 0;
  for (int bit = BITS - 1; bit >= 0; --bit) {
    const int cand = code + (1 << bit);
    if (y >= bnd_sh[cand - 1]) {
      code = cand;
    }
  }
  c_sh[e] = (uint32_t)code;

  float stored = norm;
  if (NORM_CORR) {
    const float cv = cent_sh[code];
    part_sum = tq_warp_sum(cv * cv);
    if (lane == 0) {
      red_sh[warp] = part_sum;  // safe: every thread read red_sh before the last barrier
    }
    TQ_BARRIER();
    float c2 = 0.0f;
    TQ_UNROLL for (int w = 0; w < NWARPS; ++w) {
      c2 += red_sh[w];
    }
    stored = norm / tq_max(tq_sqrt(c2), 1e-30f);
  }
  stored = stored < 65504.0f ? stored : 65504.0f;  // fp16 overflows above 65504
  TQ_BARRIER();
  uint32_t word = 0;
  if (e < W) {
    const int first = (e * 32) / BITS;
    const int last = (e * 32 + 31) / BITS;
    for (int j = first; j <= last && j < D; ++j) {
      const int shift = j * BITS - e * 32;
      word |= shift >= 0 ? (c_sh[j] << shift) : (c_sh[j] >> (-shift));
    }
  }
"""

ENCODE = _ENCODE_CORE + r"""
  if (e < W) {
    if (PACKED) {
      pk[row * PROW + (is_v ? KW : 0) + e] = word;
    } else if (is_v) {
      pv[row * W + e] = word;
    } else {
      pk[row * W + e] = word;
    }
  }
  if (e == 0) {
    if (PACKED) {
      TQ_STORE_HALF_BITS(pk, row * PROW + KW + VW, is_v ? 1 : 0, tq_half_word(stored));
    } else if (is_v) {
      nv[row] = TQ_TO_HALF(stored);
    } else {
      nk[row] = TQ_TO_HALF(stored);
    }
  }
"""

# The encode of a decode step's tokens written straight into the cache's token rows `dst`
# ([B, H_kv, capacity, KW + VW + 1] uint32, an input: written in place) at row at[0] onwards,
# capacity cap[0]: no slice update after it, which costs more host time per layer than the
# launch itself (docs/kernels.md). `done` carries no data (one zero): readers take it as an
# input, so mlx orders them after the writes. L_NEW: new tokens per head.
APPEND = _ENCODE_CORE + r"""
  const int64_t bh = row / L_NEW;
  uint32_t* out = const_cast<uint32_t*>(dst) +
      (bh * (int64_t)cap[0] + (int64_t)at[0] + (row - bh * L_NEW)) * PROW;
  if (e < W) {
    out[(is_v ? KW : 0) + e] = word;
  }
  if (e == 0) {
    TQ_STORE_HALF_BITS(out, KW + VW, is_v ? 1 : 0, tq_half_word(stored));
    if (row == 0 && !is_v) {
      done[0] = 0u;
    }
  }
"""

ATTENTION_INPUTS = (
    "q", "rot", "keys", "key_norms", "values", "value_norms", "kcent", "vcent", "mask", "pos",
    "meta", "kmean", "omega",
)  # fmt: skip
ATTENTION_OUTPUTS = ("o_part", "ml_part")
# `after`: an array the kernels never read; it orders a launch after the last one that
# touched the same cache (rows written in place, or the merge's counter; launch._Chain).
PORTABLE_INPUTS = ATTENTION_INPUTS + ("after",)
# The tensor-core kernel also merges the spans (REDUCE's work): it takes REDUCE's extra
# inputs, a counter per (batch, KV head) and `after`, an array it never reads that orders
# it after the previous launch on the same counter (see launch._Chain).
ATTENTION_TC_INPUTS = ATTENTION_INPUTS + ("sinks", "rot_t", "counter", "after")
ATTENTION_TC_OUTPUTS = ATTENTION_OUTPUTS + ("out",)
REDUCE_INPUTS = ("o_part", "ml_part", "sinks", "rot_t", "meta")
REDUCE_OUTPUTS = ("out",)
ENCODE_INPUTS = ("xk", "xv_in", "rk", "rv", "bk", "bv", "ck", "cv_in")
ENCODE_OUTPUTS = ("pk", "nk", "pv", "nv")
APPEND_INPUTS = ENCODE_INPUTS + ("dst", "at", "cap", "after")
APPEND_OUTPUTS = ("done",)

OPS = {
    "attention": (ATTENTION, PORTABLE_INPUTS, ATTENTION_OUTPUTS),
    "attention_tc": (ATTENTION_TC, ATTENTION_TC_INPUTS, ATTENTION_TC_OUTPUTS),
    "reduce": (REDUCE, REDUCE_INPUTS, REDUCE_OUTPUTS),
    "encode": (ENCODE, ENCODE_INPUTS, ENCODE_OUTPUTS),
    "append": (APPEND, APPEND_INPUTS, APPEND_OUTPUTS),
}

# Ops that only CUDA runs: the tensor-core mma, and writes into an input (APPEND: mlx's
# Metal encoder tracks hazards by declared outputs, which nothing here can test). Other
# backends return no kernel for them, and their callers take the portable op instead.
CUDA_ONLY = frozenset({"attention_tc", "append"})
