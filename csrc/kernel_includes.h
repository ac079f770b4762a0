// What every kernel variant includes before its target pragma (dispatch.h): ATen and the standard library,
// compiled for the baseline in every variant, so that an inline function several variants instantiate (the
// linker keeps one copy) never holds instructions another variant's CPU lacks. Only at::vec (which follows
// CPU_CAPABILITY) and the kernels themselves come after the pragma.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "workspace.h"
