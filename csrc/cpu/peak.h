// The machine's arithmetic ceiling, which the GEMMs (gemm.h) are measured against.
#ifndef FUSEDLSTM_CPU_PEAK_H_
#define FUSEDLSTM_CPU_PEAK_H_

namespace fusedlstm {

// Floating-point operations per second of a register-only float32 FMA loop of the GEMM
// micro-kernel's vector width (64 bytes; no memory traffic). Runs on the calling thread for
// about `seconds`.
double FmaPeakFlopsOneThread(double seconds);

}  // namespace fusedlstm

#endif  // FUSEDLSTM_CPU_PEAK_H_
