"""
Tests for cc50tw.
"""
