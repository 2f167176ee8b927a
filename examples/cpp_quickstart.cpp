// C++ quickstart: quantize a torch::nn::Linear with DuQuant and compare it with the float layer.
#include <duquant/duquant.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  torch::nn::Linear linear(torch::nn::LinearOptions(512, 256));

  duquant::Config config;  // W4A8, dynamic per-token activations, 16x16 block rotations
  duquant::DuQuantLinear quantized(linear, config);

  auto x = torch::randn({8, 512});
  auto y_float = linear(x);
  auto y_quant = quantized(x);
  double rel_err = ((y_quant - y_float).norm() / y_float.norm()).item<double>();

  std::cout << *quantized << "\n";
  std::cout << "relative output error: " << rel_err << "\n";
  for (const auto& b : quantized->named_buffers()) std::cout << "  buffer " << b.key() << " " << b.value().sizes() << " " << b.value().dtype() << "\n";
  return rel_err < 0.2 ? 0 : 1;
}
