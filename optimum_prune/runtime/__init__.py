"""Where the work runs: devices and accelerate offload stores (`offload.py`), several processes
(`distributed.py`) and host memory returned to the operating system (`host_memory.py`)."""
