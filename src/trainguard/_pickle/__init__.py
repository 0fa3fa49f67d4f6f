"""A bounded pickle opcode reader and a symbolic pickle machine. Standard library only; never unpickles."""
