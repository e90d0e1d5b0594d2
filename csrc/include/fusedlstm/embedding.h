// The sparse gradient of an embedding lookup, x[b, t] = table[ids[b, t]], for lazy (row-wise)
// optimizer updates: only the rows the batch used, each summed once.
#ifndef FUSEDLSTM_EMBEDDING_H_
#define FUSEDLSTM_EMBEDDING_H_

#include <cstdint>

namespace fusedlstm {

// ids [B, T] and dx [B, T, D] row-major; lengths [B] in 0..T (nullptr: all T) marks the valid
// positions t < lengths[b]; padded positions contribute nothing, whatever they hold. Writes the
// distinct ids of the valid positions in increasing order to rows_out and, for each, the sum of
// its dx rows to grads_out ([R, D]), added in position order (b, then t): the result depends on
// the inputs alone. Returns R. Capacity needed: B·T entries in rows_out, B·T·D in grads_out.
template <typename S>
int64_t EmbeddingRowGrads(int64_t B, int64_t T, int64_t D, const int64_t* ids,
                          const int32_t* lengths, const S* dx, int64_t* rows_out, S* grads_out);

}  // namespace fusedlstm

#endif  // FUSEDLSTM_EMBEDDING_H_
