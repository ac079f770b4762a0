// The generic kernel variant (dispatch.h): compiled for the baseline of the target (any x86-64; the only variant
// on other CPUs and compilers), products on MKL (at::addmm without it), bf16 and fp16 computed in fp32.
#include "kernel_includes.h"

#define FASTADAPTER_ISA generic
#define CPU_CAPABILITY fastadapter_generic
#include "attention_backward.h"
#include "attention_forward.h"
#define FASTADAPTER_DECODE_LINEAR_ON_ATEN 1  // decode_linear.h: at::linear, not the unvectorised tiles
#include "decode_linear.h"
#include "training_rows.h"
