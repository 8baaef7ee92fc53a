// The ops' attention arguments as the CPU kernels' shape (private to src/ops: op_attention and
// op_attention_backward take the same attention_args).
#pragma once

#include "kernels/cpu/attention.h"
#include "ops/ops.h"

namespace gptq {

inline cpu::attention_shape attention_shape_of(const attention_args& a) {
    cpu::attention_shape s;
    s.n_q        = a.n_q;
    s.n_kv       = a.n_kv;
    s.q_pos0     = a.q_pos0;
    s.n_head     = a.n_head;
    s.n_head_kv  = a.n_head_kv;
    s.head_dim   = a.head_dim;
    s.window     = a.window;
    s.scale      = a.scale;
    s.softcap    = a.softcap;
    s.q_stride   = a.q_stride;
    s.kv_stride  = a.kv_stride;
    s.out_stride = a.out_stride;
    return s;
}

}  // namespace gptq
