// Scratch memory the kernels keep from one call to the next.
//
// A fresh buffer of megabytes costs a page fault per 4 KB page on its first touch, and the allocator hands large
// blocks back to the OS when they are freed, so a call that allocates its packed panels (tile_gemm_*.h) and dq's
// fp32 copies anew pays those faults every time: on a 2-core Xeon, bf16 forward + backward at S = 512 (B = 1,
// Hq = 32, Hkv = 8, D = 128) spent about a tenth of its samples in the OS's page-fault path.
//
// Each thread that calls an op owns its buffers (thread_local), so calls from different threads never share one.
// A call's Workspace hands out the calling thread's buffers in the order the call takes them, growing one when it
// is too small; the contents of a buffer are whatever the last call left there, so a kernel must write every
// element it reads. At most FASTADAPTER_CPU_WORKSPACE_MB MiB (default 256; 0 keeps nothing) stay allocated per
// calling thread: a buffer that would pass that limit is allocated for the one call. A Workspace opened while
// another is open on the same thread (a nested call) takes fresh buffers. release_workspace() frees the calling
// thread's buffers; workspace_bytes() says how much they hold; fill_workspace() overwrites them (tests).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace fastadapter_cpu {

namespace workspace_detail {

// The calling thread's buffers, in the order a call takes them.
struct Pool {
  std::vector<at::Tensor> buffers;
  bool open = false;  // a Workspace of this thread is using them
};

inline Pool& pool() {
  thread_local Pool p;
  return p;
}

inline int64_t held_bytes(const Pool& p) {
  int64_t bytes = 0;
  for (const at::Tensor& b : p.buffers) bytes += b.defined() ? static_cast<int64_t>(b.nbytes()) : 0;
  return bytes;
}

// FASTADAPTER_CPU_WORKSPACE_MB in bytes (default 256 MiB), read at each call so that a change takes effect at
// the next one.
inline int64_t limit_bytes() {
  constexpr int64_t kDefaultMiB = 256;
  const char* env = std::getenv("FASTADAPTER_CPU_WORKSPACE_MB");
  if (env == nullptr || *env == '\0') return kDefaultMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mib >= 0,
              "fastadapter_cpu: FASTADAPTER_CPU_WORKSPACE_MB must be a whole number of MiB (0 keeps no buffers "
              "between calls), got '", env, "'");
  return static_cast<int64_t>(mib) << 20;
}

inline at::Tensor new_buffer(int64_t bytes) { return at::empty({bytes}, at::TensorOptions().dtype(at::kByte)); }

}  // namespace workspace_detail

// One call's use of the calling thread's buffers; the memory it hands out lives as long as it does.
class Workspace {
 public:
  Workspace() : pool_(workspace_detail::pool()), owner_(!pool_.open), limit_(workspace_detail::limit_bytes()) {
    if (owner_) pool_.open = true;
  }
  ~Workspace() {
    if (owner_) pool_.open = false;
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // `count` elements of T (64-byte aligned), holding whatever an earlier call left.
  template <typename T>
  T* take(int64_t count) {
    const int64_t bytes = std::max<int64_t>(count, 1) * static_cast<int64_t>(sizeof(T));
    if (owner_) {
      const size_t slot = next_++;
      if (slot == pool_.buffers.size()) pool_.buffers.emplace_back();
      at::Tensor& buffer = pool_.buffers[slot];
      if (buffer.defined() && static_cast<int64_t>(buffer.nbytes()) >= bytes) return reinterpret_cast<T*>(buffer.data_ptr());
      const int64_t held = workspace_detail::held_bytes(pool_);
      const int64_t others = held - (buffer.defined() ? static_cast<int64_t>(buffer.nbytes()) : 0);
      if (others + bytes <= limit_) {
        buffer = at::Tensor();  // free the smaller one first
        buffer = workspace_detail::new_buffer(bytes);
        return reinterpret_cast<T*>(buffer.data_ptr());
      }
    }
    one_call_.push_back(workspace_detail::new_buffer(bytes));
    return reinterpret_cast<T*>(one_call_.back().data_ptr());
  }

  // A [sizes] fp32 tensor over taken memory (contents as take's), valid while this Workspace lives.
  at::Tensor take_float(at::IntArrayRef sizes) {
    int64_t count = 1;
    for (int64_t s : sizes) count *= s;
    return at::from_blob(take<float>(count), sizes, at::TensorOptions().dtype(at::kFloat));
  }

 private:
  workspace_detail::Pool& pool_;
  const bool owner_;
  const int64_t limit_;
  size_t next_ = 0;
  std::vector<at::Tensor> one_call_;  // buffers past the limit, or of a nested call
};

// Bytes the calling thread's buffers hold between calls.
inline int64_t workspace_bytes() { return workspace_detail::held_bytes(workspace_detail::pool()); }

// Frees the calling thread's buffers (the next call allocates again).
inline void release_workspace() {
  workspace_detail::Pool& p = workspace_detail::pool();
  TORCH_CHECK(!p.open, "fastadapter_cpu: release_workspace called while a kernel of this thread is running");
  p.buffers.clear();
}

// Sets every byte the calling thread's buffers hold to `value` (0-255): 255 makes every fp32 and bf16 element a
// NaN, so that a kernel reading an element it never wrote shows in its results (tests).
inline void fill_workspace(int64_t value) {
  TORCH_CHECK(value >= 0 && value <= 255, "fastadapter_cpu: fill_workspace takes a byte value 0-255, got ", value);
  workspace_detail::Pool& p = workspace_detail::pool();
  TORCH_CHECK(!p.open, "fastadapter_cpu: fill_workspace called while a kernel of this thread is running");
  for (at::Tensor& b : p.buffers)
    if (b.defined()) b.fill_(value);
}

}  // namespace fastadapter_cpu
