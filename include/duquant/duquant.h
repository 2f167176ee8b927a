#pragma once
// Umbrella header: everything a LibTorch application needs to quantize linear layers with DuQuant.

#include "duquant/act_quant.h"
#include "duquant/config.h"
#include "duquant/duquant_linear.h"
#include "duquant/eigensolver.h"
#include "duquant/io/pack_file.h"
#include "duquant/io/safetensors.h"
#include "duquant/io/safetensors_torch.h"
#include "duquant/layer_pack.h"
#include "duquant/pack_linear.h"
#include "duquant/pack_model.h"
#include "duquant/reference_forward.h"
#include "duquant/weight_quant.h"
