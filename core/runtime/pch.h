// The one precompiled header: LibTorch. Reused by every target that includes it (REUSE_FROM).
#pragma once
#include <torch/torch.h>
