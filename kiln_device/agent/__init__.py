"""kiln-agent: signed A/B updates from an OCI registry (see cli.py for the commands and exit codes).

Modules, in the order an update uses them: config (agent.json, release.json), versions
(decide), journal (state.json, fault points), oci (registry and layout), slot (erofs,
the slot device), bootctl (entries on the ESP), install, reconcile (on boot), cli.
"""
