"""autonorm.RMSNorm and LayerNorm as drop-ins for torch.nn's: the same state_dict keys and outputs, Gemma's
(1 + w) scale starting as the identity, and numpy integers taken as sizes wherever torch.nn takes them."""
import numpy as np
import torch

import autonorm


def test_modules_match_torch_state_dict_and_outputs(use_backend):
    use_backend("torch")
    ours, theirs = autonorm.LayerNorm(32), torch.nn.LayerNorm(32)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.weight.data.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x))
    rms, trms = autonorm.RMSNorm(32, eps=1e-6), torch.nn.RMSNorm(32, eps=1e-6)
    assert rms.state_dict().keys() == trms.state_dict().keys()
    torch.testing.assert_close(rms(x), trms(x))
    gemma = autonorm.RMSNorm(32, offset=1.0)
    assert torch.all(gemma.weight == 0)  # (1 + w) starts as the identity scale
    torch.testing.assert_close(gemma(x), trms(x), atol=1e-5, rtol=1e-5)


def test_modules_and_functions_take_numpy_integers_as_torch_nn_does(use_backend):
    use_backend("torch")
    x = torch.randn(3, 32)
    for ours, theirs in ((autonorm.LayerNorm, torch.nn.LayerNorm), (autonorm.RMSNorm, torch.nn.RMSNorm)):
        module = ours(np.int64(32))
        assert module.normalized_shape == theirs(np.int64(32)).normalized_shape == (32,)
        torch.testing.assert_close(module(x), theirs(32)(x))
    torch.testing.assert_close(autonorm.rms_norm(x, np.int64(32)), torch.nn.functional.rms_norm(x, (32,)))
    torch.testing.assert_close(autonorm.layer_norm(x.double(), np.int32(32)),  # the torch fallback too
                               torch.nn.functional.layer_norm(x.double(), (32,)))
