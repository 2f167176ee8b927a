#pragma once
// Per-row symmetric weight quantization with the scale search of DESIGN.md §2, and int4 packing.

#include <torch/torch.h>

namespace duquant {

struct QuantizedRows {
  torch::Tensor codes;   // int8 [N, K], in [-2^(b-1), 2^(b-1)-1]
  torch::Tensor scales;  // float32 [N]
};

// Scale candidates (max|row| / (2^(b-1)-1)) / a, a in {0.5, 0.75, 1, 1.25, 1.5}; the one with the
// lowest mean squared error of the dequantized row wins (ties: first); floor 1e-8.
// w: float64 (or float32) [N, K]; the search runs in w's dtype on w's device.
QuantizedRows quantize_rows(const torch::Tensor& w, int64_t bits);

// int8 codes [N, K] in [-8, 7] -> uint8 [N, ceil(K/2)]: column 2j in the low nibble, 2j+1 high.
torch::Tensor pack_int4(const torch::Tensor& codes);
// Inverse of pack_int4; `cols` = K (needed when K is odd).
torch::Tensor unpack_int4(const torch::Tensor& packed, int64_t cols);

// The float32 weight [N, K] the reference path multiplies with: codes * scale, or the stored
// float weight when unquantized.
torch::Tensor dequantize_weight(const torch::Tensor& qweight, const torch::Tensor& w_scale, int64_t wbits,
                                int64_t in_features);

}  // namespace duquant
