#include "core/model/packed_linear.h"

namespace ptk::model {

int64_t PackedDecodeWeights::bytes() const {
  int64_t b = lm_head ? lm_head->bytes() : 0;
  for (const auto& l : layers)
    b += l.q.bytes() + l.k.bytes() + l.v.bytes() + l.o.bytes() + l.gate.bytes() + l.up.bytes() + l.down.bytes();
  return b;
}

}  // namespace ptk::model
