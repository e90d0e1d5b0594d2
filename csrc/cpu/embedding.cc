// Sparse embedding gradient (see fusedlstm/embedding.h): sort the valid (id, position) pairs,
// then sum each id's run of dx rows in position order.
#include "fusedlstm/embedding.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

namespace fusedlstm {

template <typename S>
int64_t EmbeddingRowGrads(int64_t B, int64_t T, int64_t D, const int64_t* ids,
                          const int32_t* lengths, const S* dx, int64_t* rows_out, S* grads_out) {
  std::vector<std::pair<int64_t, int64_t>> keys;  // (id, b·T + t)
  keys.reserve(static_cast<size_t>(B * T));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lengths ? lengths[b] : T;
    for (int64_t t = 0; t < len; ++t) keys.emplace_back(ids[b * T + t], b * T + t);
  }
  std::sort(keys.begin(), keys.end());  // by id, then position: a total order, no ties
  int64_t r = -1;
  for (size_t k = 0; k < keys.size(); ++k) {
    const S* src = dx + keys[k].second * D;
    if (k == 0 || keys[k].first != keys[k - 1].first) {
      rows_out[++r] = keys[k].first;
      std::memcpy(grads_out + r * D, src, sizeof(S) * D);
    } else {
      S* dst = grads_out + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
    }
  }
  return r + 1;
}

template int64_t EmbeddingRowGrads<float>(int64_t, int64_t, int64_t, const int64_t*, const int32_t*,
                                          const float*, int64_t*, float*);
template int64_t EmbeddingRowGrads<double>(int64_t, int64_t, int64_t, const int64_t*,
                                           const int32_t*, const double*, int64_t*, double*);

}  // namespace fusedlstm
