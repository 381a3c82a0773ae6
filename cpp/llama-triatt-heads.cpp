// llama-triatt-heads.cpp: per-head eviction (pytriatt), see docs/eviction.md "Per-head eviction".
//
// A llama.cpp KV cell holds one token for every head of every layer. Per-head, each group of heads
// (a KV head index across all layers, or one KV head of one layer) ranks the sequence's cached tokens
// on its own and keeps its own top-budget. The round then keeps budget cells and, for every group,
// moves the K and V rows (that head's head_dim values) of its kept tokens that sit in freed cells into
// surviving cells whose token the group dropped. Attention never needs to know which token a cell holds
// for a head: K is stored post-RoPE and every cached token is older than the next batch, so the causal
// mask (built from the cell's position) is the same for every head.

#include "llama-triatt-policy.h"
#include "llama-triatt-kv.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-impl.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

int32_t llama_kv_policy::n_head_groups() const {
    switch (params.granularity) {
        case LLAMA_KV_POLICY_PER_KV_HEAD:    return n_head_kv;
        case LLAMA_KV_POLICY_PER_LAYER_HEAD: return (int32_t) layers.size() * n_head_kv;
        default:                             return 1;
    }
}

int32_t llama_kv_policy::head_group(size_t li, int32_t g) const {
    switch (params.granularity) {
        case LLAMA_KV_POLICY_PER_KV_HEAD:    return g;
        case LLAMA_KV_POLICY_PER_LAYER_HEAD: return (int32_t) li * n_head_kv + g;
        default:                             return 0;
    }
}

llama_kv_policy::head_map & llama_kv_policy::head_map_of(const llama_kv_cache & kv, uint32_t stream) {
    if (head_maps.size() <= stream) {
        head_maps.resize(stream + 1);
    }
    head_map & hm = head_maps[stream];
    const size_t kv_size = kv.get_size();
    if (hm.cell_pos.size() != kv_size) {
        hm.cell_pos.assign(kv_size, -1);
        hm.pos.assign(kv_size * n_head_groups(), -1);
    }
    return hm;
}

llama_pos llama_kv_policy::head_pos(const head_map & hm, const llama_kv_cells & cells, int32_t grp, uint32_t cell) const {
    const llama_pos p = cells.pos_get(cell);
    // a cell whose position changed since the map was written was freed and refilled: its own token again
    return hm.cell_pos[cell] == p ? hm.pos[(size_t) grp * hm.cell_pos.size() + cell] : p;
}

void llama_kv_policy::forget_cells(llama_kv_cache & kv, llama_seq_id seq_id, bool held) {
    if (params.granularity == LLAMA_KV_POLICY_SHARED) {
        return;
    }
    head_map & hm = head_map_of(kv, kv.get_stream(seq_id));
    const llama_kv_cells & cells = kv.get_cells(seq_id);
    for (uint32_t c = 0; c < hm.cell_pos.size(); ++c) {
        if (cells.is_empty(c) || (held && cells.seq_has(c, seq_id))) {
            hm.cell_pos[c] = -1;
        }
    }
}

// copy head segment g of cell src into cell dst, for every move, in one stream of a K or V storage tensor
//   transposed: V stored one row per channel (element (cell c, channel j) at j*kv_size + c)
//   staged:     the tensor is not in host memory: read the stream's rows, move, write them back
static void triatt_move_segments(ggml_tensor * t, uint32_t stream, bool transposed, int64_t head_dim,
                                 const std::vector<llama_kv_policy::head_move> & moves, bool staged,
                                 std::vector<uint8_t> & stage) {
    if (moves.empty()) {
        return;
    }
    const size_t off_stream = stream * t->nb[2];
    size_t n_bytes = t->nb[2]; // a transposed stream is one slab
    if (!transposed) {
        uint32_t n_rows = 0;
        for (const auto & m : moves) {
            n_rows = std::max(n_rows, std::max(m.src, m.dst) + 1);
        }
        n_bytes = n_rows * t->nb[1];
    }
    uint8_t * base = nullptr;
    if (staged) {
        stage.resize(n_bytes);
        ggml_backend_tensor_get(t, stage.data(), off_stream, n_bytes);
        base = stage.data();
    } else {
        base = (uint8_t *) t->data + off_stream;
    }
    if (!transposed) {
        // whole quantization blocks: head_dim is a multiple of the block size (checked at init)
        const size_t seg = ggml_row_size(t->type, head_dim);
        for (const auto & m : moves) {
            memcpy(base + m.dst * t->nb[1] + m.g * seg, base + m.src * t->nb[1] + m.g * seg, seg);
        }
    } else {
        const size_t es = ggml_type_size(t->type);
        const size_t kv_size = t->ne[1];
        for (const auto & m : moves) {
            for (int64_t d = 0; d < head_dim; ++d) {
                const size_t row = ((size_t) m.g * head_dim + d) * kv_size;
                memcpy(base + (row + m.dst) * es, base + (row + m.src) * es, es);
            }
        }
    }
    if (staged) {
        ggml_backend_tensor_set(t, stage.data(), off_stream, n_bytes);
    }
}

// the same moves as a ggml graph on the backend that holds t (a cache in device memory stays there): t's stream
// seen as rows of one head's segment (cell c, head g is row c*n_head_kv + g), the moved rows gathered to f32
// and scattered back (exact for f32/f16/bf16, and for q8_0/q4_0 whose blocks re-quantize to themselves).
// Returns false if the backend cannot run it; the caller then stages the rows through the host
static bool triatt_move_segments_graph(ggml_backend_t backend, ggml_gallocr_t galloc, ggml_tensor * t, uint32_t stream,
                                       int64_t head_dim, const std::vector<llama_kv_policy::head_move> & moves) {
    if (moves.empty()) {
        return true;
    }
    if (backend == nullptr || galloc == nullptr || t->ne[0] % head_dim != 0) {
        return false;
    }
    const int64_t n_seg = t->ne[0] / head_dim;   // head segments per cell
    std::vector<int32_t> src(moves.size());
    std::vector<int64_t> dst(moves.size());
    for (size_t i = 0; i < moves.size(); ++i) {
        src[i] = (int32_t) (moves[i].src * n_seg + moves[i].g);
        dst[i] = (int64_t) moves[i].dst * n_seg + moves[i].g;
    }
    std::vector<uint8_t> meta(ggml_tensor_overhead() * 16 + ggml_graph_overhead());
    ggml_init_params ip = { /*.mem_size =*/ meta.size(), /*.mem_buffer =*/ meta.data(), /*.no_alloc =*/ true };
    ggml_context * gctx = ggml_init(ip);
    if (!gctx) {
        return false;
    }
    ggml_tensor * rows = ggml_view_2d(gctx, t, head_dim, n_seg * t->ne[1], ggml_row_size(t->type, head_dim),
                                      (size_t) stream * t->nb[2]);
    ggml_tensor * idx_src = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, (int64_t) src.size());
    ggml_tensor * idx_dst = ggml_new_tensor_1d(gctx, GGML_TYPE_I64, (int64_t) dst.size());
    ggml_set_input(idx_src);
    ggml_set_input(idx_dst);
    ggml_tensor * moved = ggml_set_rows(gctx, rows, ggml_get_rows(gctx, rows, idx_src), idx_dst);
    ggml_set_output(moved);
    ggml_cgraph * gf = ggml_new_graph(gctx);
    ggml_build_forward_expand(gf, moved);
    bool ok = true;
    for (int i = 0; i < ggml_graph_n_nodes(gf) && ok; ++i) {
        ok = ggml_backend_supports_op(backend, ggml_graph_node(gf, i));
    }
    ok = ok && ggml_gallocr_alloc_graph(galloc, gf);
    if (ok) {
        ggml_backend_tensor_set(idx_src, src.data(), 0, ggml_nbytes(idx_src));
        ggml_backend_tensor_set(idx_dst, dst.data(), 0, ggml_nbytes(idx_dst));
        ok = ggml_backend_graph_compute(backend, gf) == GGML_STATUS_SUCCESS;
    }
    ggml_free(gctx);
    return ok;
}

bool llama_kv_policy::round_per_head(llama_context & ctx, llama_kv_cache & kv, llama_seq_id seq_id,
                                     const triatt_select_params & sel, int64_t & n_keep) {
    const llama_kv_cells & cells = kv.get_cells(seq_id);
    const uint32_t stream = kv.get_stream(seq_id);
    const int64_t  n      = (int64_t) cand_pos.size();
    const int32_t  n_grp  = n_head_groups();
    const int32_t  n_gqa  = n_head / n_head_kv;
    const size_t   n_li   = layers.size();

    // 1. every group ranks the candidates with its own heads' scores
    grp_keep.assign((size_t) n_grp * n, 0);
    n_keep = -1;
    for (int32_t grp = 0; grp < n_grp; ++grp) {
        const int32_t g   = grp % n_head_kv;
        const size_t  li0 = params.granularity == LLAMA_KV_POLICY_PER_LAYER_HEAD ? grp / n_head_kv : 0;
        const size_t  li1 = params.granularity == LLAMA_KV_POLICY_PER_LAYER_HEAD ? li0 + 1 : n_li;
        grp_scores.resize((li1 - li0) * n * n_gqa);
        grp_ptrs.clear();
        for (size_t li = li0; li < li1; ++li) {
            const float * src = cand_scores.data() + li * (size_t) n * n_head + (size_t) g * n_gqa;
            float * dst = grp_scores.data() + (li - li0) * (size_t) n * n_gqa;
            for (int64_t i = 0; i < n; ++i) {
                memcpy(dst + i * n_gqa, src + i * n_head, n_gqa * sizeof(float));
            }
            grp_ptrs.push_back(dst);
        }
        std::string err;
        const int64_t k = triatt_select(selector, sel, n, cand_pos.data(), grp_ptrs.data(), (int32_t) grp_ptrs.size(),
                                        n_gqa, 1, keep.data(), &err);
        if (k < 1) {
            error = "KV policy: " + (err.empty() ? std::string("no token kept") : err);
            return false;
        }
        // every group keeps the same number: the same protected candidates, the same budget
        GGML_ASSERT(n_keep < 0 || k == n_keep);
        n_keep = k;
        for (int64_t j = 0; j < k; ++j) {
            grp_keep[(size_t) grp * n + keep[j]] = 1;
        }
    }

    // 2. the surviving cells: those kept by the most groups (fewest moves). A cell this sequence shares with
    //    another one can survive only if every group keeps its token: its rows must not change
    std::vector<int32_t> & count = grp_count;
    count.assign(n, 0);
    for (int32_t grp = 0; grp < n_grp; ++grp) {
        for (int64_t i = 0; i < n; ++i) {
            count[i] += grp_keep[(size_t) grp * n + i];
        }
    }
    std::vector<int64_t> & order = grp_order;
    order.clear();
    for (int64_t i = 0; i < n; ++i) {
        if (count[i] == n_grp || cells.seq_count(cand_cell[i]) == 1) {
            order.push_back(i);
        }
    }
    if ((int64_t) order.size() < n_keep) {
        return false; // too many shared cells: the caller evicts whole cells this round
    }
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return count[a] != count[b] ? count[a] > count[b] : cand_pos[a] > cand_pos[b];
    });
    surviving.assign(n, 0);
    for (int64_t j = 0; j < n_keep; ++j) {
        surviving[order[j]] = 1;
    }

    // 3. per group: its kept tokens in freed cells move into surviving cells whose token it dropped
    head_map & hm = head_map_of(kv, stream);
    const size_t kv_size = hm.cell_pos.size();
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t c = cand_cell[i];
        if (hm.cell_pos[c] != cand_pos[i]) {
            hm.cell_pos[c] = cand_pos[i];
            for (int32_t grp = 0; grp < n_grp; ++grp) {
                hm.pos[(size_t) grp * kv_size + c] = cand_pos[i];
            }
        }
    }
    moves.clear();
    for (int32_t grp = 0; grp < n_grp; ++grp) {
        const uint8_t * kept = grp_keep.data() + (size_t) grp * n;
        int64_t d = 0;
        for (int64_t s = 0; s < n; ++s) {
            if (!kept[s] || surviving[s]) {
                continue;
            }
            while (d < n && (!surviving[d] || kept[d])) {
                ++d;
            }
            GGML_ASSERT(d < n && "a group keeps more tokens than there are surviving cells");
            moves.push_back({ grp, cand_cell[s], cand_cell[d] });
            hm.pos[(size_t) grp * kv_size + cand_cell[d]] = hm.pos[(size_t) grp * kv_size + cand_cell[s]];
            ++d;
        }
    }

    // 4. move the rows, layer by layer: in place in host memory; in device memory by a graph on the cache's
    //    backend (force_move_graph: that for host caches too; force_move_staged: the host copy)
    const bool force_staged = force_move_staged;
    const bool force_graph  = force_move_graph;
    std::vector<head_move> & lm = layer_moves;
    for (size_t li = 0; li < n_li && !moves.empty(); ++li) {
        lm.clear();
        for (const auto & m : moves) {
            // per KV head: a group spans every layer; per layer and head: only its own
            if (params.granularity == LLAMA_KV_POLICY_PER_KV_HEAD || (size_t) m.g / n_head_kv == li) {
                lm.push_back({ m.g % n_head_kv, m.src, m.dst });
            }
        }
        ggml_tensor * k = kv.get_k_storage(layers[li]);
        ggml_tensor * v = kv.get_v_storage(layers[li]);
        for (ggml_tensor * t : { k, v }) {
            const bool    transposed = t == v && kv.get_v_trans();
            const int64_t hd         = t == k ? head_dim : head_dim_v;
            const bool    on_host    = t->buffer && ggml_backend_buffer_is_host(t->buffer);
            if (!force_staged && (force_graph || !on_host) && !transposed) {
                ggml_backend_t be = triatt_backend_of(ctx, t);
                if (be && be != move_galloc_backend) {
                    ggml_gallocr_free(move_galloc);
                    move_galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
                    move_galloc_backend = move_galloc ? be : nullptr;
                }
                if (triatt_move_segments_graph(be, move_galloc, t, stream, hd, lm)) {
                    continue;
                }
                if (force_graph) {
                    error = std::string("KV policy: moving head rows of a ") + ggml_type_name(t->type) +
                            " cache by a graph on its backend failed (PYTRIATT_MOVE_BACKEND=1)";
                    return false;
                }
            }
            triatt_move_segments(t, stream, transposed, hd, lm, force_staged || !on_host, move_stage);
        }
    }
    n_moved = (uint64_t) moves.size() * (params.granularity == LLAMA_KV_POLICY_PER_KV_HEAD ? n_li : 1);

    evict.clear();
    for (int64_t i = 0; i < n; ++i) {
        if (!surviving[i]) {
            evict.push_back(cand_pos[i]);
        }
    }
    return true;
}

int32_t llama_kv_policy::head_positions(llama_kv_cache & kv, llama_seq_id seq_id, int32_t il, int32_t head_kv,
                                        llama_pos * out, int32_t n_max) {
    const auto it = std::find(layers.begin(), layers.end(), il);
    if (it == layers.end() || head_kv < 0 || head_kv >= n_head_kv) {
        return -1;
    }
    const llama_kv_cells & cells = kv.get_cells(seq_id);
    std::vector<llama_pos> pos;
    const head_map & hm = head_map_of(kv, kv.get_stream(seq_id));
    const int32_t grp = head_group((size_t) (it - layers.begin()), head_kv);
    for (const auto & [p, c] : cells.seq_pos_get(seq_id)) {
        pos.push_back(head_pos(hm, cells, grp, c));
    }
    std::sort(pos.begin(), pos.end());
    for (int32_t i = 0; i < std::min<int32_t>(n_max, (int32_t) pos.size()); ++i) {
        out[i] = pos[i];
    }
    return (int32_t) pos.size();
}
