"""Identity preservation: RestorerID (SD-1.5 + structure encoder + SPADE + IDBalance + IP-Adapter-FaceID-Plus
tokens from a reference photo) and its adaptive ID scale. reference/restorerid_and_adaptation.md part A."""
