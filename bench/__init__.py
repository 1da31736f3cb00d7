"""Lastmile's benchmark harness: load generator (:mod:`lastmile.appliance.client.loadgen`), in-process limit
(:mod:`bench.limit`), naive server (:mod:`bench.naive`), peer framework
(:mod:`bench.peer_litserve`) and the run that puts them side by side (:mod:`bench.run`)."""
