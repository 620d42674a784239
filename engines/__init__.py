"""Export and inference engines (installed as fastp2p.engines); filled by the engines issue."""
