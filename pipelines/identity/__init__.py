"""Identity preservation from a reference photo: RestorerID (SD-1.5 + time-aware structure encoder + SPADE +
IDBalance + IP-Adapter-FaceID-Plus tokens) and its adaptive ID scale. reference/restorerid_and_adaptation.md
part A."""
