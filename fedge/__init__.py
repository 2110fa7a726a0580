"""fedge: federated learning for fleets of small Linux devices.

This top package holds only the ``fedge`` command and what the agent and the
aggregator share without knowing each other (config file loading, sd_notify).
The rooms of DESIGN.md are installed beside it: ``fedge.protocol``,
``fedge.models``, ``fedge.firmware_bridge``, ``fedge.agent``, ``fedge.aggregator``
and ``fedge.fleet``.
"""

__version__ = "0.1.0"
