"""The self-supervised methods that train an encoder against prototypes, one class each.

Chosen on the command line by class (``--model.host DINO|IBOT|CARP``) with its own typed
options (``--model.host.patch_weight 0.5``). Every host runs the paper's three steps in
:meth:`Host.step <protogmm.hosts.base.Host.step>` and fills in its own teacher targets,
student scores and loss. Pure PyTorch: no Lightning.
"""

from protogmm.hosts.base import Host, StepContext, StepOutput, Targets, TeacherOutput
from protogmm.hosts.carp import CARP
from protogmm.hosts.dino import DINO
from protogmm.hosts.ibot import IBOT

__all__ = ["CARP", "DINO", "Host", "IBOT", "StepContext", "StepOutput", "Targets", "TeacherOutput"]
