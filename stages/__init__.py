"""Registered lmpipe stages, one package per stage."""
